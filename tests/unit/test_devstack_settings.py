"""Settings of the local stack are read from an explicit environment and validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.devstack.settings import DEFAULT_PORTS, SettingsError, StackSettings


def test_defaults(tmp_path: Path) -> None:
    s = StackSettings.from_env({"HOME": str(tmp_path)})
    assert s.ports == DEFAULT_PORTS
    assert s.external == {}
    assert s.state_dir == Path(".replicator-dev").absolute()
    assert s.cache_dir == tmp_path / ".cache" / "wedsync-replicator"


def test_ports_state_and_external_services_from_env(tmp_path: Path) -> None:
    s = StackSettings.from_env({
        "REPLICATOR_DEV_PG15_PORT": "25432",
        "REPLICATOR_DEV_DIR": str(tmp_path / "state"),
        "REPLICATOR_DEV_KAFKA": "broker:9092",
        "REPLICATOR_DEV_S3_ENDPOINT": "",  # empty means unset
    })
    assert s.ports["pg15"] == 25432
    assert s.ports["pg18"] == DEFAULT_PORTS["pg18"]
    assert s.state_dir == tmp_path / "state"
    assert s.external == {"kafka": "broker:9092"}


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_a_bad_port_names_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match=f"REPLICATOR_DEV_KAFKA_PORT={value!r}"):
        StackSettings.from_env({"REPLICATOR_DEV_KAFKA_PORT": value})
