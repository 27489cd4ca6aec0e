"""Configuration is validated at load; errors name the file and the key; secrets stay out."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.config import ConfigError, load_config

GOOD = """
[source]
dsn = "postgresql://replicator@db.internal:5432/wedsync"
tables = ["weddings", "public.guests"]

[priority.tables."guests"]
column = "wedding_id"

[kafka]
topic_prefix = "wedsync"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "replicator.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.source.tables == ("public.weddings", "public.guests")
    assert "public.guests" in cfg.priority.tables
    assert cfg.kafka.partitions == 6 and cfg.source.slot == "wedsync_replicator"


def test_the_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "examples" / "local.toml", environ={})
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:19092"


@pytest.mark.parametrize(("text", "needle"), [
    (GOOD.replace("topic_prefix", "topic_prefx"), "kafka.topic_prefx: unknown key"),
    (GOOD.replace('tables = ["weddings"', 'tables = ["a.b.c"'), "source.tables"),
    ("[kafka]\n", "source: Field required"),
    (GOOD + "\n[priority]\ncritical_days = 40\n", "priority: Value error, need critical_days"),
    ("[source\n", "not valid TOML"),
    (GOOD.replace("[kafka]", "[kafka]\npartitions = 0"), "kafka.partitions"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"replicator\.toml") as info:
        load_config(write(tmp_path, text), environ={})
    assert needle in str(info.value)


def test_password_comes_from_the_environment_and_is_never_printed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), environ={"REPLICATOR_SOURCE_PASSWORD": "s3cret"})
    assert cfg.source.password is not None
    assert cfg.source.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.model_dump())


def test_a_password_in_the_file_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("[source]", '[source]\npassword = "hunter2"')
    with pytest.raises(ConfigError, match="must not be in the file") as info:
        load_config(write(tmp_path, text), environ={})
    assert "hunter2" not in str(info.value)


DEST = """
[[destinations]]
name = "local"
url = "file:///var/lib/wedsync/archive"

[[destinations]]
name = "{second}"
url = "{url}"
"""


def test_destinations_load(tmp_path: Path) -> None:
    text = GOOD + DEST.format(second="s3", url="s3://wedsync-backup/prod?region=eu-west-2")
    cfg = load_config(write(tmp_path, text), environ={})
    assert [d.name for d in cfg.destinations] == ["local", "s3"]
    assert cfg.destinations[1].flush.critical_s == 5.0


@pytest.mark.parametrize(("second", "url", "needle"), [
    ("local", "mem://x", "repeated: local"),
    ("ftp", "ftp://host/path", "destinations.1.url"),
    ("ftp", "ftp://host/path", "s3://..., az://..., gs://..., file://..., mem://..."),
    ("Bad Name", "mem://x", "destinations.1.name"),
])
def test_destination_mistakes_are_named(tmp_path: Path, second: str, url: str,
                                        needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + DEST.format(second=second, url=url)), environ={})
    assert needle in str(info.value)


@pytest.mark.parametrize(("text", "needle"), [
    (GOOD + '\n[metrics]\nlisten = "localhost"\n', "metrics.listen: Value error, 'localhost' is "
     "not host:port"),
    (GOOD + '\n[metrics]\nlisten = "::1:9187"\n', "metrics.listen: Value error, '::1:9187': "
     "write an IPv6 address in brackets"),
    (GOOD + '\n[metrics]\nlisten = "127.0.0.1:70000"\n', "metrics.listen"),
    (GOOD + '\n[priority]\ntimezone = "Mars/Olympus_Mons"\n',
     "priority.timezone: Value error, unknown time zone 'Mars/Olympus_Mons'"),
    (GOOD + '\n[priority]\ntimezone = "../../etc/passwd"\n', "priority.timezone"),
    (GOOD.replace("postgresql://replicator@db.internal:5432/wedsync", "not a dsn"),
     "source.dsn: Value error, not a libpq connection string"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"replicator\.toml") as info:
        load_config(write(tmp_path, text), environ={})
    assert needle in str(info.value)


def test_metrics_may_listen_on_ipv6() -> None:
    from replicator.config import listen_address

    assert listen_address("[::1]:9187") == ("::1", 9187)
    assert listen_address(":0") == ("127.0.0.1", 0)
    assert listen_address("0.0.0.0:9187") == ("0.0.0.0", 9187)


def test_a_dsn_error_does_not_quote_the_dsn(tmp_path: Path) -> None:
    text = GOOD.replace("postgresql://replicator@db.internal:5432/wedsync",
                        "host=db password=s3cret oops")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert "s3cret" not in str(info.value) and "oops" not in str(info.value)


def test_the_file_must_be_utf8_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})
    path = tmp_path / "latin1.toml"
    path.write_bytes(GOOD.replace("wedsync", "wedsync\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        load_config(path, environ={})
