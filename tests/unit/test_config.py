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


RULES = GOOD + """
[conflicts."timeline_items"]
role_column = "updated_by_role"
precedence = ["venue", "planner", "photographer", "florist", "couple"]
window_s = 300
column_groups = { schedule = ["starts_at", "ends_at"], notes = ["notes"] }
group_precedence = { notes = ["photographer", "venue"] }

[conflicts.'"odd.schema"."Shot List"']
window_s = 1.5
"""


def test_conflict_rules_load_as_the_merge_policies(tmp_path: Path) -> None:
    from replicator.archive.merge import ConflictPolicy
    from replicator.config import conflict_policies

    cfg = load_config(write(tmp_path, RULES), environ={})
    policies = cfg.policies
    assert set(policies) == {"public.timeline_items", '"odd.schema"."Shot List"'}
    timeline = policies["public.timeline_items"]
    assert timeline == ConflictPolicy(
        window_us=300_000_000, precedence=("venue", "planner", "photographer", "florist",
                                           "couple"),
        role_column="updated_by_role",
        column_groups={"schedule": ("starts_at", "ends_at"), "notes": ("notes",)},
        group_precedence={"notes": ("photographer", "venue")})
    assert timeline.rank("venue") > timeline.rank("couple") > timeline.rank("nobody") == 0
    assert timeline.rank("photographer", "notes") > timeline.rank("venue", "notes")
    odd = policies['"odd.schema"."Shot List"']
    assert odd.window_us == 1_500_000 and odd.precedence == () and odd.column_groups is None
    # The same section as the service hands it to its compaction child (JSON, then parsed).
    dumped = {t: r.model_dump(mode="json") for t, r in cfg.conflicts.items()}
    assert conflict_policies(dumped) == policies
    assert conflict_policies(None) == {} and load_config(write(tmp_path, GOOD), {}).policies == {}


@pytest.mark.parametrize(("rule", "needle"), [
    ('precedence = ["venue"]', "precedence needs role_column"),
    ('role_column = "r"\nwindow_s = -1', "conflicts.t.window_s"),
    ('role_column = "r"\nwindow_s = "soon"', "conflicts.t.window_s"),
    ('role_column = "r"\nprecedence = ["venue", "venue"]', "lists venue more than once"),
    ('role_column = "r"\ncolumn_groups = { a = ["x"], b = ["x"] }',
     "column 'x' in two groups"),
    ('role_column = "r"\ncolumn_groups = { a = [] }', "column group 'a' has no columns"),
    ('role_column = "r"\ngroup_precedence = { a = ["venue"] }', "names 'a', which is not"),
    ('role_colum = "r"', "conflicts.t.role_colum: unknown key"),
])
def test_a_bad_conflict_rule_names_its_table_and_key(tmp_path: Path, rule: str,
                                                       needle: str) -> None:
    from replicator.config import conflict_policies

    text = GOOD + f'\n[conflicts."t"]\n{rule}\n'
    with pytest.raises(ConfigError, match=r"replicator\.toml") as info:
        load_config(write(tmp_path, text), environ={})
    assert needle in str(info.value)
    assert "conflicts" in str(info.value)
    import tomllib

    with pytest.raises(ConfigError, match="conflicts"):
        conflict_policies(tomllib.loads(text)["conflicts"])


def test_two_spellings_of_one_table_are_refused(tmp_path: Path) -> None:
    text = GOOD + '\n[conflicts."t"]\nwindow_s = 1\n[conflicts."public.t"]\nwindow_s = 2\n'
    with pytest.raises(ConfigError, match=r"two conflict rules for public\.t"):
        load_config(write(tmp_path, text), environ={})
