"""Where the local stack lives and listens, and which services are external.

All settings are read once, from an explicit environment mapping, by `StackSettings.from_env`:

| variable | default | meaning |
|---|---|---|
| `REPLICATOR_DEV_DIR` | `.replicator-dev` | state directory (data, logs, PID files) |
| `REPLICATOR_DEV_CACHE` | `~/.cache/wedsync-replicator` | Kafka jars, Azurite, Toxiproxy |
| `REPLICATOR_DEV_<SERVICE>_PORT` | see `DEFAULT_PORTS` | port of a native service |
| `REPLICATOR_DEV_PG15_DSN` ... (see `EXTERNAL_VARS`) | unset | use that running service |

`<SERVICE>` is one of `PG15`, `PG18`, `KAFKA`, `KAFKA_CONTROLLER`, `S3`, `AZURE`, `GCS`,
`TOXIPROXY` (its API; `REPLICATOR_DEV_TOXIPROXY` names a running one by its API's URL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from replicator.errors import OperatorError

DEFAULT_PORTS: Mapping[str, int] = {
    "pg15": 15432,
    "pg18": 18432,
    "kafka": 19092,
    "kafka_controller": 19093,
    "s3": 19000,
    "azure": 10000,
    "gcs": 4443,
    "toxiproxy": 8474,
}

#: The variable that points a service at an already-running instance, and what it holds.
EXTERNAL_VARS: Mapping[str, str] = {
    "pg15": "REPLICATOR_DEV_PG15_DSN",
    "pg18": "REPLICATOR_DEV_PG18_DSN",
    "kafka": "REPLICATOR_DEV_KAFKA",
    "s3": "REPLICATOR_DEV_S3_ENDPOINT",
    "azure": "REPLICATOR_DEV_AZURE_ENDPOINT",
    "gcs": "REPLICATOR_DEV_GCS_ENDPOINT",
    "toxiproxy": "REPLICATOR_DEV_TOXIPROXY",
}

# Public, well-known development credentials of the S3 emulator; not secrets. Azurite's
# account and key live with the connectors (connectors.registry), which accept them.
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"


class SettingsError(OperatorError, ValueError):
    """A REPLICATOR_DEV_* variable has a value that cannot be used."""


@dataclass(frozen=True)
class StackSettings:
    state_dir: Path
    cache_dir: Path
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    external: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], state_dir: Path | None = None) -> StackSettings:
        ports = dict(DEFAULT_PORTS)
        for name in ports:
            var = f"REPLICATOR_DEV_{name.upper()}_PORT"
            raw = environ.get(var)
            if raw is None:
                continue
            try:
                port = int(raw)
            except ValueError:
                raise SettingsError(f"{var}={raw!r} is not a port number") from None
            if not 0 < port < 65536:
                raise SettingsError(f"{var}={raw!r} is outside 1..65535")
            ports[name] = port
        external = {name: environ[var] for name, var in EXTERNAL_VARS.items() if environ.get(var)}
        home = Path(environ.get("HOME", "~")).expanduser()
        cache = Path(environ.get("REPLICATOR_DEV_CACHE") or home / ".cache" / "wedsync-replicator")
        state = state_dir or Path(environ.get("REPLICATOR_DEV_DIR") or ".replicator-dev")
        return cls(state_dir=state.absolute(), cache_dir=cache.absolute(), ports=ports,
                   external=external)
