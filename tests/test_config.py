"""The gateway config loads typed values and reports every problem with file, line and key.

Data-driven cases live in tests/cases/config/<name>/: `gateway.toml`, the exact
issue lines in `expected.txt` (empty for a valid file; `{known_drivers}` stands for the
registered driver names, `{case_dir}` for
the case folder), and an empty `check_devices` file to load with device checks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.config
from agent._tomlpos import KeyLines
from agent.config import (
    BrokerConfig,
    Config,
    ConfigError,
    ConfigIssue,
    GatewayConfig,
    HealthConfig,
    IdentityConfig,
    OtaConfig,
    SpoolConfig,
    load_config,
)
from drivers import family_names, registry
from drivers.base import Driver, OptionError

REPO = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "cases" / "config"
SAMPLE = REPO / "docs" / "sample-gateway.toml"

MINIMAL = """\
[identity]
key = "/id/gateway.key"
cert = "/id/gateway.crt"
ca = "/id/ca.crt"

[broker]
host = "mqtt.example.city"
"""


def _write(directory: Path, text: str) -> Path:
    path = directory / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _outcome(path: Path, *, check_devices: bool = False) -> Config | ConfigError:
    try:
        return load_config(path, check_devices=check_devices)
    except ConfigError as error:
        return error


def _issues(path: Path, *, check_devices: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_devices=check_devices)
    return [str(issue) for issue in caught.value.issues]


# -- the case folders -------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_case_folder_gives_exactly_the_expected_issues(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = CASES / case
    expected = (folder / "expected.txt").read_text(encoding="utf-8")
    expected = expected.replace("{known_drivers}", ", ".join(family_names()))
    expected_lines = expected.replace("{case_dir}", str(folder)).splitlines()
    monkeypatch.chdir(folder)
    outcome = _outcome(Path("gateway.toml"), check_devices=(folder / "check_devices").exists())
    if isinstance(outcome, ConfigError):
        assert str(outcome).splitlines() == expected_lines
    else:
        assert expected_lines == []


def test_case_folders_cover_the_required_situations() -> None:
    names = {p.name for p in CASES.iterdir() if p.is_dir()}
    assert {
        "valid_minimal",
        "valid_full",
        "toml_syntax_error",
        "unknown_key_in_broker",
        "wrong_type_for_port",
        "port_out_of_range",
        "missing_identity_key",
        "unknown_driver",
        "bad_sensor_id",
        "backoff_max_below_initial",
        "several_errors",
        "check_devices_missing_port",
        "pms5003_option_error",
    } <= names


# -- values and paths ------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.gateway == GatewayConfig(state_dir=Path("/var/lib/citygate"), log_level="info")
    assert config.broker == BrokerConfig(
        host="mqtt.example.city",
        port=8883,
        prefix="citygate",
        keepalive_s=30,
        inflight=16,
        connect_timeout_s=10.0,
        backoff_initial_s=0.5,
        backoff_max_s=60.0,
    )
    assert config.spool == SpoolConfig(
        path=Path("/var/lib/citygate/spool.sqlite"),
        budget_bytes=64 * 1024 * 1024,
        commit_interval_s=0.5,
        batch_max_readings=500,
        batch_interval_s=2.0,
    )
    assert config.sensors == ()


def test_relative_paths_are_taken_from_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '[gateway]\nstate_dir = "state"\n' + MINIMAL.replace('"/id/gateway.key"', '"id/k"')
    _write(tmp_path, text)
    monkeypatch.chdir(REPO)  # the working directory must not matter
    config = load_config(tmp_path / "gateway.toml")
    assert config.gateway.state_dir == tmp_path / "state"
    assert config.identity.key == tmp_path / "id" / "k"
    assert config.identity.cert == Path("/id/gateway.crt")


def test_spool_path_is_taken_from_the_state_directory(tmp_path: Path) -> None:
    text = '[gateway]\nstate_dir = "/srv/cg"\n[spool]\npath = "data/spool.db"\n' + MINIMAL
    config = load_config(_write(tmp_path, text))
    assert config.spool.path == Path("/srv/cg/data/spool.db")


def test_config_source_is_the_absolute_file_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("gateway.toml")).source == tmp_path / "gateway.toml"


def test_seconds_accept_integers_and_become_floats(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL + "connect_timeout_s = 3\n"))
    assert config.broker.connect_timeout_s == 3.0
    assert isinstance(config.broker.connect_timeout_s, float)


def test_host_may_be_an_ip_address_but_not_a_url(tmp_path: Path) -> None:
    for host in ("192.0.2.1", "2001:db8::1", "broker.local."):
        text = MINIMAL.replace("mqtt.example.city", host)
        assert load_config(_write(tmp_path, text)).broker.host == host
    path = _write(tmp_path, MINIMAL.replace("mqtt.example.city", "mqtt.example.city:8883"))
    assert _issues(path) == [
        f"{path}:7: broker.host: not a valid host name or IP address: 'mqtt.example.city:8883'"
    ]


# -- file-level errors --------------------------------------------------------------


def test_missing_file_is_one_issue_about_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert _issues(path) == [f"{path}:0: file: no such file"]


def test_invalid_utf8_is_reported_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(MINIMAL.encode() + b'prefix = "caf\xe9"\n')
    assert _issues(path) == [f"{path}:8: syntax: not valid UTF-8 text"]


def test_error_at_end_of_document_points_at_the_last_line(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "tags = [1,\n  2,\n\n\n")
    assert _issues(path) == [f"{path}:9: syntax: Invalid value (at end of file)"]


def test_issue_and_error_text_formats() -> None:
    issue = ConfigIssue("gateway.toml", 14, "sensors.bin_7.port", "no such device /dev/ttyUSB9")
    assert str(issue) == "gateway.toml:14: sensors.bin_7.port: no such device /dev/ttyUSB9"
    error = ConfigError([issue, ConfigIssue("g.toml", 1, "broker.host", "missing required key")])
    assert str(error).splitlines() == [str(issue), "g.toml:1: broker.host: missing required key"]
    assert error.issues[0] is issue


# -- device checks -------------------------------------------------------------------


def test_device_checks_are_off_by_default(tmp_path: Path) -> None:
    text = MINIMAL + '[sensors.bin_7]\ndriver = "pms5003"\nport = "/dev/ttyUSB9"\n'
    config = load_config(_write(tmp_path, text))
    assert [sensor.sensor_id for sensor in config.sensors] == ["bin_7"]


def test_unreadable_identity_file_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("k", "c", "a"):
        (tmp_path / name).write_text("x")
    (tmp_path / "k").chmod(0)
    if os.geteuid() == 0:  # root may read anything: give the answer a normal user would get
        real_access = os.access
        unreadable = tmp_path / "k"

        def access(path: Any, mode: int, **kwargs: Any) -> bool:
            return False if Path(path) == unreadable else real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    text = MINIMAL.replace("/id/gateway.key", "k").replace("/id/gateway.crt", "c")
    path = _write(tmp_path, text.replace("/id/ca.crt", "a"))
    assert _issues(path, check_devices=True) == [
        f"{path}:2: identity.key: cannot read {tmp_path / 'k'}: permission denied"
    ]


# -- driver families -------------------------------------------------------------------


@dataclass(frozen=True)
class _FakeOptions:
    sensor_id: str
    table: dict[str, Any]


class _FakeFamily:
    """A family that keeps what it was given and rejects `bad` and `broken` options."""

    name = "fake"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> object:
        if "bad" in table:
            raise OptionError("bad", "not allowed here")
        if "broken" in table:
            raise ValueError("something inside the family went wrong")
        return _FakeOptions(sensor_id, dict(table))

    def create(self, sensor_id: str, options: object) -> Driver:
        raise NotImplementedError

    def decode(self, data: bytes) -> list[tuple[str, str, float]]:
        raise NotImplementedError


@pytest.fixture
def fake_family(monkeypatch: pytest.MonkeyPatch) -> _FakeFamily:
    family = _FakeFamily()
    monkeypatch.setattr(agent.config, "_known_drivers", lambda: ("fake", "pms5003"))
    monkeypatch.setattr(agent.config, "_family", lambda name: family)
    return family


@pytest.mark.usefixtures("fake_family")
def test_family_gets_the_whole_sensor_table_and_its_options_are_kept(tmp_path: Path) -> None:
    text = MINIMAL + '[sensors.z]\ndriver = "fake"\nx = 1\n[sensors.a]\ndriver = "fake"\n'
    config = load_config(_write(tmp_path, text))
    assert [(s.sensor_id, s.driver) for s in config.sensors] == [("z", "fake"), ("a", "fake")]
    assert config.sensors[0].options == _FakeOptions("z", {"driver": "fake", "x": 1})


@pytest.mark.usefixtures("fake_family")
def test_option_error_names_the_sensor_key_and_its_line(tmp_path: Path) -> None:
    text = MINIMAL + '[sensors.s1]\ndriver = "fake"\n\nbad = 2\n[sensors.s2]\nbroken = 1\n'
    path = _write(tmp_path, text.replace("[sensors.s2]", '[sensors.s2]\ndriver = "fake"'))
    assert _issues(path) == [
        f"{path}:11: sensors.s1.bad: not allowed here",
        f"{path}:12: sensors.s2: driver 'fake' rejected the options: "
        "something inside the family went wrong",
    ]


@pytest.mark.usefixtures("fake_family")
def test_unknown_driver_lists_the_known_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + '[sensors.s]\ndriver = "foo"\n')
    assert _issues(path) == [
        f"{path}:9: sensors.s.driver: unknown driver 'foo'; known: fake, pms5003"
    ]


@pytest.mark.parametrize("name", registry.family_names())
def test_each_driver_sample_block_loads_in_a_gateway_config(name: str, tmp_path: Path) -> None:
    block = (REPO / "drivers" / name / "sample.toml").read_text(encoding="utf-8")
    config = load_config(_write(tmp_path, MINIMAL + block))
    assert {sensor.driver for sensor in config.sensors} == {name}


# -- the documented sample ---------------------------------------------------------------


def test_sample_config_loads() -> None:
    config = load_config(SAMPLE)
    assert [(s.sensor_id, s.driver) for s in config.sensors] == [("air_1", "pms5003")]


def test_sample_config_shows_every_key_with_its_default(tmp_path: Path) -> None:
    sample = load_config(SAMPLE)
    defaults = load_config(_write(tmp_path, MINIMAL))
    assert sample.gateway == defaults.gateway
    assert sample.spool == defaults.spool
    assert dataclasses.replace(sample.broker, host="x") == dataclasses.replace(
        defaults.broker, host="x"
    )
    raw = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    for table, kind in (
        ("gateway", GatewayConfig),
        ("identity", IdentityConfig),
        ("broker", BrokerConfig),
        ("spool", SpoolConfig),
        ("health", HealthConfig),
        ("ota", OtaConfig),
    ):
        # a key whose default is "unset" is shown commented out
        unset = {"ca"} if kind is OtaConfig else set()
        names = [field.name for field in dataclasses.fields(kind) if field.name not in unset]
        assert list(raw[table]) == names
    assert "\n# ca = " in SAMPLE.read_text(encoding="utf-8")
    assert sample.ota == defaults.ota
    assert set(raw) == {field.name for field in dataclasses.fields(Config)} - {"source"}


# -- the locator -----------------------------------------------------------------------


def test_locator_follows_headers_dotted_quoted_and_inline_keys() -> None:
    lines = KeyLines(
        "# top\n"  # 1
        "[broker]  # the broker\n"  # 2
        "host = 'h' # x = 1\n"  # 3
        'tags = ["a]", """\n'  # 4
        '[not_a_table]\n"""]\n'  # 5, 6
        '[sensors."a b"]\n'  # 7
        "opts.deep = { port = 1, more = { x = [1, {y = 2}] } }\n"  # 8
        "\n"  # 9
        "[[arrays]]\n"  # 10
    )
    assert lines.line_of(("broker", "host")) == 3
    assert lines.line_of(("broker", "missing")) == 2
    assert lines.line_of(("not_a_table",)) == 1
    assert lines.line_of(("sensors",)) == 7
    assert lines.line_of(("sensors", "a b", "opts", "deep", "more", "x")) == 8
    assert lines.line_of(("sensors", "a b", "nope")) == 7
    assert lines.line_of(("arrays",)) == 10
    assert lines.line_of(("identity", "key")) == 1


_BARE = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
_QUOTED = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=6
)
_VALUE = st.sampled_from(
    ["1", '"a # b = c"', "'x'", "[1,\n  2,  # ]\n]", '"""\n[t]\nk = 1\n"""', "{ a = 1 }", "true"]
)


@given(
    tables=st.dictionaries(
        st.one_of(_BARE, _QUOTED),
        st.dictionaries(_BARE, st.tuples(_VALUE, st.booleans()), max_size=5),
        max_size=5,
    )
)
def test_locator_finds_the_line_of_every_key(
    tables: dict[str, dict[str, tuple[str, bool]]],
) -> None:
    text = "# generated\n"
    expected: dict[tuple[str, ...], int] = {}
    for table, keys in tables.items():
        header = table if re.fullmatch(r"[A-Za-z0-9_-]+", table) else f'"{table}"'
        expected[(table,)] = text.count("\n") + 1
        text += f"[ {header} ]  # a comment\n"
        for key, (value, blank_before) in keys.items():
            text += "\n" if blank_before else ""
            expected[(table, key)] = text.count("\n") + 1
            text += f"  {key} = {value}\n"
    tomllib.loads(text)  # the generated text is valid TOML
    lines = KeyLines(text)
    assert {path: lines.line_of(path) for path in expected} == expected


# -- nothing but ConfigError, whatever the input ------------------------------------------

_KEYS = [
    *("gateway", "identity", "broker", "spool", "sensors", "sensors.s1", "sensors.s2", "x"),
    *("state_dir", "log_level", "key", "cert", "ca", "host", "port", "prefix", "inflight"),
    *("keepalive_s", "backoff_initial_s", "backoff_max_s", "path", "budget_bytes", "driver"),
    *("batch_interval_s", "baud", "mode", "poll_interval_s", '"a b"', "s1.driver"),
]
_VALUES = [
    *("1", "0", "-1", "70000", "1.5", "nan", "-inf", "true", '""', '"pms5003"', '"info"'),
    *('"/dev/ttyUSB9"', '"/dev/null"', '"x\\u0000y"', "1979-05-27", "[1, [2]]", "{ a = 1 }"),
    *('"passive"', "9600", "'mqtt.example.city'", '"/etc/passwd"', '"."', "[[]]"),
]
_LINE = st.one_of(
    st.sampled_from(_KEYS).map(lambda key: f"[{key}]"),
    st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)).map(" = ".join),
    st.text(max_size=20),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _load_or_config_error(path: Path, check_devices: bool) -> None:
    """Anything but a ConfigError escapes and fails the test."""
    outcome = _outcome(path, check_devices=check_devices)
    if isinstance(outcome, ConfigError):
        assert outcome.issues
        last_line = path.read_bytes().count(b"\n") + 1
        assert all(0 <= issue.line <= last_line and issue.key for issue in outcome.issues)
    else:
        assert isinstance(outcome, Config)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(), check_devices=st.booleans())
def test_arbitrary_text_gives_a_config_or_a_config_error(
    fuzz_dir: Path, text: str, check_devices: bool
) -> None:
    path = fuzz_dir / "text.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_config_error(path, check_devices)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=25), check_devices=st.booleans())
def test_config_like_text_gives_a_config_or_a_config_error(
    fuzz_dir: Path, lines: list[str], check_devices: bool
) -> None:
    path = fuzz_dir / "lines.toml"
    path.write_bytes((MINIMAL + "\n".join(lines)).encode("utf-8", "surrogatepass"))
    _load_or_config_error(path, check_devices)
