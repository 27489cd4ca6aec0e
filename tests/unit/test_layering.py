"""The package rules of docs/ARCHITECTURE.md, checked on the source: imports go down the
stages, the archive loads no Kafka client, and object names are spelled only in
`archive/layout.py`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "replicator"


def _imports(path: Path) -> set[str]:
    """Every module *path* imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("sink", "replicator.replay"),
    ("replay", "replicator.sink"),
    ("archive", "replicator.sink"),
    ("archive", "replicator.replay"),
    ("archive", "replicator.source"),
    ("archive", "aiokafka"),
    ("archive", "confluent_kafka"),
])
def test_imports_go_down_the_stages(package: str, forbidden: str) -> None:
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in sorted((PACKAGE / package).rglob("*.py"))
                 for name in sorted(_imports(path))
                 if name == forbidden or name.startswith(forbidden + ".")]
    assert not offenders, offenders


def test_the_archive_reader_loads_no_kafka_client() -> None:
    code = ("import replicator.archive.reader, sys; "
            "loaded = [m for m in ('aiokafka', 'confluent_kafka') if m in sys.modules]; "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


_NAME_LITERAL = re.compile(
    r"""["'](segments|checkpoints|snapshots|transactions|schemas|gaps|deadletters)/""")


def test_object_names_are_spelled_only_in_the_layout() -> None:
    offenders = []
    for folder in (PACKAGE, ROOT / "connectors", ROOT / "benchmarks"):
        for path in sorted(folder.rglob("*.py")):
            if path == PACKAGE / "archive" / "layout.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.FunctionDef,
                                               ast.AsyncFunctionDef, ast.ClassDef))
                          and node.body and isinstance(node.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docstrings
                        and _NAME_LITERAL.search(repr(node.value))):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, offenders


def test_no_module_is_over_800_lines() -> None:
    long = [f"{path.relative_to(ROOT)}: {n}" for folder in (PACKAGE, ROOT / "connectors")
            for path in sorted(folder.rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > 800]
    assert not long, long
