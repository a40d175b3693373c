"""The gateway's configuration: one TOML file, read and checked once at start-up.

`load_config` parses the file, checks every table and key against the schema
(docs/sample-gateway.toml documents it), lets each sensor's driver family check
its own options, and either returns a frozen `Config` or raises one
`ConfigError` listing every problem found, each naming the file, line and key.

Trust: the file's content is untrusted input; nothing from it is used before it
has been checked here. Only a regular file of at most MAX_CONFIG_BYTES is read,
and an error message shows at most MAX_SHOWN_ISSUES problems, each on one line.
Driver families are trusted to check their own options and to report problems
as `OptionError`. With `check_devices` the identity files and `/dev/...` ports
are looked at on disk (stat only; nothing is opened).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent._tomlpos import KeyLines, KeyPath, Report, Table, describe_type, render_key
from drivers import registry
from drivers.base import DriverFamily, OptionError

DEFAULT_STATE_DIR = Path("/var/lib/citygate")
LOG_LEVELS = ("debug", "info", "warning", "error")

_SENSOR_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: subjects of health reports and events that are not sensors (agent.health, agent.commands)
_RESERVED_IDS = frozenset({"agent", "commands"})
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9._-]+")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)$")
_TABLES = ("gateway", "identity", "broker", "spool", "rotation", "health", "ota", "sensors")
_MIB = 1 << 20
#: a gateway config is a few kilobytes: a bigger file is refused unread (checking it would
#: cost time and memory for nothing)
MAX_CONFIG_BYTES = _MIB
#: the most problems an error lists; one last line counts the others
MAX_SHOWN_ISSUES = 50
#: the longest message shown for one problem (messages quote values from the file)
_MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    state_dir: Path
    log_level: str


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    key: Path
    cert: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str
    port: int
    prefix: str
    keepalive_s: int
    inflight: int
    connect_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    # false asks for plaintext MQTT: refused unless the agent is started with
    # --insecure-plaintext-for-development (and then loudly reported)
    tls: bool = True
    # after an outage, unacknowledged messages from before the reconnection are sent
    # at most this many per second while fresh ones go first (DESIGN.md §2)
    backlog_messages_per_s: float = 50.0


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path
    budget_bytes: int
    commit_interval_s: float
    batch_max_readings: int
    batch_interval_s: float
    # readings held in memory while the disk refuses writes; beyond it the oldest go (counted)
    memory_max_readings: int = 50_000


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Signed health reports and events (agent.health)."""

    interval_s: float = 60.0  # a health report at least this often
    events_max: int = 100  # events kept in memory while offline; beyond it the oldest go


@dataclass(frozen=True, slots=True)
class RotationConfig:
    """Automatic certificate renewal (agent.rotation)."""

    renew: bool = True  # false: never renew automatically
    renew_at_fraction: float = 0.667
    reply_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class OtaConfig:
    """Signed over-the-air updates (agent.ota; docs/adr/0007-ota-updates.md)."""

    repo: str = ""  # an https:// URL or a directory (a USB stick); "" = no automatic checks
    root: Path = Path("/opt/citygate")  # releases/<version>, current, committed
    trusted_root: Path = Path("/etc/citygate/update-root.json")  # the TUF root shipped with it
    channel: str = "stable"
    hardware: str = "generic"
    check_interval_s: int = 21600  # 0: only on an ota/offer hint or the command line
    trial_deadline_s: float = 300.0  # a new release must get a health message acked by then
    max_trial_starts: int = 3  # a new release started more often than this is rolled back
    max_bundle_bytes: int = 256 * 1024 * 1024
    download_timeout_s: float = 1800.0
    ca: Path | None = None  # CA of an https repository (None: the system's CAs)


@dataclass(frozen=True, slots=True)
class BinGeometry:
    """Where an ultrasonic sensor on a bin's lid sees the bottom (empty) and the top (full)."""

    empty_distance_m: float
    full_distance_m: float


@dataclass(frozen=True, slots=True)
class SensorConfig:
    sensor_id: str
    driver: str
    options: object  # whatever the driver family's parse_options returned
    bin: BinGeometry | None = None  # set for fill-level sensors: derive fill_level from distance


@dataclass(frozen=True, slots=True)
class Config:
    source: Path  # the config file, made absolute
    gateway: GatewayConfig
    identity: IdentityConfig
    broker: BrokerConfig
    spool: SpoolConfig
    sensors: tuple[SensorConfig, ...]
    rotation: RotationConfig = RotationConfig()
    health: HealthConfig = HealthConfig()
    ota: OtaConfig = OtaConfig()


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file; `line` 0 means the file as a whole."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {_one_line(self.message)}"


def _one_line(text: str) -> str:
    """`text` as one printable line: line breaks and terminal escapes (from values quoted
    out of the file) escaped, and a long text cut short."""
    shown = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
    if len(shown) <= _MAX_MESSAGE_CHARS:
        return shown
    return f"{shown[:_MAX_MESSAGE_CHARS]}... ({len(shown) - _MAX_MESSAGE_CHARS} more characters)"


class ConfigError(Exception):
    """The config file cannot be used; `issues` lists every problem found, in line order.

    Its text is one line per problem, at most MAX_SHOWN_ISSUES of them and then
    one line that counts the rest.
    """

    def __init__(self, issues: list[ConfigIssue]) -> None:
        lines = [str(issue) for issue in issues[:MAX_SHOWN_ISSUES]]
        if len(issues) > MAX_SHOWN_ISSUES:
            hidden = len(issues) - MAX_SHOWN_ISSUES
            lines.append(f"{issues[0].file}:0: config: {hidden} more problem(s) not shown")
        super().__init__("\n".join(lines))
        self.issues = issues


# the driver registry, looked up through these two seams (tests replace them)
def _family(name: str) -> DriverFamily:
    return registry.family(name)


def _known_drivers() -> tuple[str, ...]:
    return registry.family_names()


# -- reading the file ----------------------------------------------------------


def _issue(path: Path, line: int, key: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(str(path), line, key, message)])


def _read_text(path: Path) -> str:
    """The file's text. Only a regular file of at most MAX_CONFIG_BYTES is read: a FIFO
    would block and a device such as /dev/zero would never end."""
    try:
        raw = _read_bounded(path)
    except FileNotFoundError:
        raise _issue(path, 0, "file", "no such file") from None
    except OSError as exc:
        raise _issue(path, 0, "file", f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _issue(path, 0, "file", f"larger than {MAX_CONFIG_BYTES} bytes: not a gateway config")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _issue(path, line, "syntax", "not valid UTF-8 text") from None


def _read_bounded(path: Path) -> bytes:
    """Up to MAX_CONFIG_BYTES + 1 bytes of a regular file (OSError for anything else)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just after)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(errno.EINVAL, kind)
        with open(fd, "rb", closefd=False) as file:
            return file.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)


def _digits_line(text: str) -> int:
    """The line of the first number too long for Python to convert, else 1."""
    limit = sys.get_int_max_str_digits()
    match = re.search(rf"[0-9][0-9_]{{{limit},}}", text)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line = str(exc), 1
        if match := _TOML_AT.search(message):
            line = int(match.group(1))
            message = f"{message[: match.start()]} (column {match.group(2)})"
        elif match := _TOML_AT_END.search(message):
            line = text.rstrip().count("\n") + 1
            message = f"{message[: match.start()]} (at end of file)"
        raise _issue(path, line, "syntax", message) from None
    except RecursionError:
        raise _issue(path, 1, "syntax", "values nested too deeply") from None
    except ValueError:  # int() refuses decimal numbers of more than 4300 digits
        message = f"a number longer than {sys.get_int_max_str_digits()} digits"
        raise _issue(path, _digits_line(text), "syntax", message) from None


# -- the schema ---------------------------------------------------------------------


def _gateway(table: Table, config_dir: Path) -> GatewayConfig:
    state_dir = table.path("state_dir", DEFAULT_STATE_DIR, base=config_dir)
    log_level = table.choice("log_level", "info", LOG_LEVELS)
    table.finish()
    return GatewayConfig(state_dir=state_dir, log_level=log_level)


def _identity(table: Table, config_dir: Path) -> IdentityConfig:
    key = table.path("key", None, base=config_dir)
    cert = table.path("cert", None, base=config_dir)
    ca = table.path("ca", None, base=config_dir)
    table.finish()
    return IdentityConfig(key=key, cert=cert, ca=ca)


def _host_problem(host: str) -> str | None:
    if "://" in host:
        return f"expected a host name, not a URL: {host!r}"
    labels = host.removesuffix(".").split(".")
    if len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"not a valid host name or IP address: {host!r}"
    return None


def _prefix_problem(prefix: str) -> str | None:
    if _TOPIC_LEVEL.fullmatch(prefix):
        return None
    return f"must be one topic level of A-Z a-z 0-9 . _ - characters, got {prefix!r}"


def _broker(table: Table) -> BrokerConfig:
    host = table.text("host", None, check=_host_problem)
    port = table.integer("port", 8883, 1, 65535)
    prefix = table.text("prefix", "citygate", check=_prefix_problem)
    keepalive_s = table.integer("keepalive_s", 30, 5, 3600)
    inflight = table.integer("inflight", 16, 1, 1000)
    connect_timeout_s = table.number("connect_timeout_s", 10.0, at_most=300.0)
    initial = table.number("backoff_initial_s", 0.5, at_most=3600.0)
    maximum = table.number("backoff_max_s", 60.0, at_most=86400.0)
    tls = table.boolean("tls", True)
    backlog_rate = table.number("backlog_messages_per_s", 50.0, at_most=10000.0)
    if table.ok("backoff_initial_s", "backoff_max_s") and maximum < initial:
        table.problem(
            "backoff_max_s", f"must be at least backoff_initial_s ({initial:g}), got {maximum:g}"
        )
    table.finish()
    return BrokerConfig(
        host=host,
        port=port,
        prefix=prefix,
        keepalive_s=keepalive_s,
        inflight=inflight,
        connect_timeout_s=connect_timeout_s,
        backoff_initial_s=initial,
        backoff_max_s=maximum,
        backlog_messages_per_s=backlog_rate,
        tls=tls,
    )


def _spool(table: Table, state_dir: Path) -> SpoolConfig:
    path = table.path("path", state_dir / "spool.sqlite", base=state_dir)
    budget_bytes = table.integer("budget_bytes", 64 * _MIB, _MIB, None)
    commit_interval_s = table.number("commit_interval_s", 0.5, at_most=10.0)
    batch_max_readings = table.integer("batch_max_readings", 500, 1, 10000)
    batch_interval_s = table.number("batch_interval_s", 2.0, at_most=3600.0)
    memory_max_readings = table.integer("memory_max_readings", 50_000, 100, 10_000_000)
    table.finish()
    return SpoolConfig(
        path=path,
        budget_bytes=budget_bytes,
        commit_interval_s=commit_interval_s,
        batch_max_readings=batch_max_readings,
        batch_interval_s=batch_interval_s,
        memory_max_readings=memory_max_readings,
    )


def _health(table: Table) -> HealthConfig:
    interval_s = table.number("interval_s", 60.0, at_most=86400.0)
    events_max = table.integer("events_max", 100, 1, 100_000)
    table.finish()
    return HealthConfig(interval_s=interval_s, events_max=events_max)


def _rotation(table: Table) -> RotationConfig:
    renew = table.boolean("renew", True)
    fraction = table.number("renew_at_fraction", 0.667, at_most=0.95)
    if table.ok("renew_at_fraction") and fraction < 0.1:
        table.problem("renew_at_fraction", f"must be at least 0.1, got {fraction:g}")
    reply_timeout_s = table.number("reply_timeout_s", 60.0, at_most=3600.0)
    table.finish()
    return RotationConfig(renew=renew, renew_at_fraction=fraction, reply_timeout_s=reply_timeout_s)


def _repo_problem(repo: str) -> str | None:
    if not repo or repo.startswith("https://") or repo.startswith("/"):
        return None
    if repo.startswith("file:///"):
        return None
    return f"expected an https:// URL or an absolute directory, got {repo!r}"


def _name_problem(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return None
    return f"expected 1-64 characters of A-Z a-z 0-9 . _ -, got {value!r}"


def _ota(table: Table, config_dir: Path) -> OtaConfig:
    defaults = OtaConfig()
    repo = table.text("repo", "", check=_repo_problem)
    root = table.path("root", defaults.root, base=config_dir)
    trusted_root = table.path("trusted_root", defaults.trusted_root, base=config_dir)
    channel = table.text("channel", defaults.channel, check=_name_problem)
    hardware = table.text("hardware", defaults.hardware, check=_name_problem)
    check_interval_s = table.integer("check_interval_s", defaults.check_interval_s, 0, 30 * 86400)
    if table.ok("check_interval_s") and 0 < check_interval_s < 60:
        table.problem("check_interval_s", f"must be 0 (off) or at least 60, got {check_interval_s}")
    trial_deadline_s = table.number("trial_deadline_s", defaults.trial_deadline_s, at_most=86400.0)
    max_trial_starts = table.integer("max_trial_starts", defaults.max_trial_starts, 1, 20)
    max_bundle_bytes = table.integer(
        "max_bundle_bytes", defaults.max_bundle_bytes, _MIB, 4096 * _MIB
    )
    timeout = table.number("download_timeout_s", defaults.download_timeout_s, at_most=86400.0)
    ca = table.path("ca", config_dir, base=config_dir) if "ca" in table.data else None
    if ca is None:
        table.read.append("ca")
    table.finish()
    return OtaConfig(
        repo=repo,
        root=root,
        trusted_root=trusted_root,
        channel=channel,
        hardware=hardware,
        check_interval_s=check_interval_s,
        trial_deadline_s=trial_deadline_s,
        max_trial_starts=max_trial_starts,
        max_bundle_bytes=max_bundle_bytes,
        download_timeout_s=timeout,
        ca=ca,
    )


def _driver(report: Report, where: KeyPath, raw: Mapping[str, Any]) -> DriverFamily | None:
    """The family named by the sensor table's `driver` key, or None (after reporting)."""
    driver = raw.get("driver")
    if driver is None:
        report.add((*where, "driver"), "missing required key")
    elif not isinstance(driver, str):
        report.add((*where, "driver"), f"expected a string, got {describe_type(driver)}")
    elif driver not in _known_drivers():
        known = ", ".join(_known_drivers())
        report.add((*where, "driver"), f"unknown driver {driver!r}; known: {known}")
    else:
        try:
            return _family(driver)
        except ImportError as exc:  # e.g. a library the family needs is not installed
            report.add((*where, "driver"), f"driver {driver!r} cannot be loaded: {exc}")
    return None


def _sensor(report: Report, sensor_id: str, raw: object) -> SensorConfig | None:
    where = ("sensors", sensor_id)
    if not _SENSOR_ID.fullmatch(sensor_id):
        report.add(where, "sensor id must be 1 to 32 characters of A-Z a-z 0-9 _ -")
    elif sensor_id in _RESERVED_IDS:
        report.add(where, f"sensor id {sensor_id!r} is reserved (health reports use it)")
    if not isinstance(raw, dict):
        report.add(where, f"expected a table, got {describe_type(raw)}")
        return None
    family = _driver(report, where, raw)
    if family is None:
        return None
    driver = str(raw["driver"])
    geometry = _bin(report, where, raw.get("bin"))
    raw = {key: value for key, value in raw.items() if key not in _AGENT_SENSOR_KEYS}
    try:
        options = family.parse_options(sensor_id, raw)
    except OptionError as exc:
        report.add((*where, exc.key), exc.message)
        return None
    except (ValueError, TypeError) as exc:
        report.add(where, f"driver {driver!r} rejected the options: {exc}")
        return None
    return SensorConfig(sensor_id=sensor_id, driver=driver, options=options, bin=geometry)


#: keys of a sensor table that belong to the agent's pipeline, not to the driver
_AGENT_SENSOR_KEYS = frozenset({"bin"})


def _bin(report: Report, where: KeyPath, raw: object) -> BinGeometry | None:
    """`bin = { empty_distance_m = 1.2, full_distance_m = 0.25 }` of a fill-level sensor."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        report.add((*where, "bin"), f"expected a table, got {describe_type(raw)}")
        return None
    table = Table(report, (*where, "bin"), raw)
    empty = table.required_number("empty_distance_m", at_most=20.0)
    full = table.required_number("full_distance_m", at_most=20.0)
    table.finish()
    if table.ok("empty_distance_m", "full_distance_m") and not empty > full:
        table.problem(
            "full_distance_m", f"must be less than empty_distance_m ({empty:g}), got {full:g}"
        )
    return BinGeometry(empty, full)


def _sensors(report: Report, raw: object) -> tuple[SensorConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        report.add(("sensors",), f"expected a table, got {describe_type(raw)}")
        return ()
    found = (_sensor(report, sensor_id, table) for sensor_id, table in raw.items())
    return tuple(sensor for sensor in found if sensor is not None)


# -- optional checks on the machine --------------------------------------------------


def _file_problem(path: Path) -> str | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"no such file {path}"
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file: {path}"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    return None


def _check_devices(report: Report, identity: IdentityConfig, raw_sensors: object) -> None:
    for name, path in (("key", identity.key), ("cert", identity.cert), ("ca", identity.ca)):
        if not report.has(("identity", name)) and (problem := _file_problem(path)):
            report.add(("identity", name), problem)
    if not isinstance(raw_sensors, dict):
        return
    for sensor_id, table in raw_sensors.items():
        port = table.get("port") if isinstance(table, dict) else None
        where = ("sensors", sensor_id, "port")
        missing = isinstance(port, str) and port.startswith("/dev/") and not os.path.exists(port)
        if missing and not report.has(where):
            report.add(where, f"no such device {port}")


# -- the entry point -------------------------------------------------------------------


def _table(report: Report, data: Mapping[str, Any], name: str) -> Table:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        report.add((name,), f"expected a table, got {describe_type(raw)}")
        raw = {}
    return Table(report, (name,), raw)


def read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text of a TOML file and its tables, with the same size, file-type and syntax
    checks (and FILE:LINE messages, as a ConfigError) as a gateway config gets."""
    text = _read_text(path)
    return text, _parse(path, text)


def load_config(path: Path, *, check_devices: bool = False) -> Config:
    """Read and check the config file at `path`; raise ConfigError listing every problem.

    Relative paths in the file are taken from the file's directory, except
    `spool.path`, which is taken from `gateway.state_dir`. With `check_devices`
    the identity files must be readable and every `/dev/...` sensor port must exist.
    """
    text, data = read_toml(path)
    report = Report()
    for name, value in data.items():
        if name not in _TABLES:
            kind = "table" if isinstance(value, dict) else "key"
            report.add((name,), f"unknown {kind}; expected one of: {', '.join(_TABLES)}")
    config_dir = path.absolute().parent
    gateway = _gateway(_table(report, data, "gateway"), config_dir)
    identity = _identity(_table(report, data, "identity"), config_dir)
    broker = _broker(_table(report, data, "broker"))
    spool = _spool(_table(report, data, "spool"), gateway.state_dir)
    rotation = _rotation(_table(report, data, "rotation"))
    health = _health(_table(report, data, "health"))
    ota = _ota(_table(report, data, "ota"), config_dir)
    sensors = _sensors(report, data.get("sensors"))
    if check_devices:
        _check_devices(report, identity, data.get("sensors"))
    if report.problems:
        lines = KeyLines(text)
        issues = [
            ConfigIssue(str(path), lines.line_of(where), render_key(where), message)
            for where, message in report.problems
        ]
        issues.sort(key=lambda issue: issue.line)
        raise ConfigError(issues)
    return Config(
        source=path.absolute(),
        gateway=gateway,
        identity=identity,
        broker=broker,
        spool=spool,
        sensors=sensors,
        rotation=rotation,
        health=health,
        ota=ota,
    )
