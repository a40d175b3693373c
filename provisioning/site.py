"""The site file: what one gateway needs at its first boot, checked before anything is made.

A technician (or operations) writes one short TOML file per gateway: its id, its
radio link (Wi-Fi or a cellular APN), the broker and its CA, the one-time
enrollment token, optional clock settings, the optional update repository with
the TUF root metadata the gateway trusts for it, and optional sensors.
images/firstboot/site.example.toml documents every key. `read_site` checks all
of it and returns a `Site`, or raises `agent.config.ConfigError` listing every
problem as FILE:LINE: KEY: MESSAGE, like the gateway config's own errors.

The gateway config that the seed installs is written here too, and checked with
`agent.config.load_config`, the check the agent itself makes at start-up; what
it finds (a sensor's options, the broker's host) is reported at the site file's
line that the value came from.

Trust: the site file and the files it names are untrusted input. They hold
secrets (token, Wi-Fi passphrase, SIM PIN, claim key): no message and no `repr`
shows them. The update root must be TUF root metadata signed by a threshold of its
own root keys (python-tuf's Metadata API checks it, as the gateway's TUF client
will before trusting it); whether those are the right keys is the site file's word.
"""

from __future__ import annotations

import re
import tempfile
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from agent._tomlpos import KeyLines, KeyPath, Report, Table, describe_type, render_key
from agent.config import ConfigError, ConfigIssue, load_config
from agent.identity import is_valid_gateway_id
from provisioning.sitechecks import (
    Check,
    apn_problem,
    certificates_problem,
    claim_problem,
    country_problem,
    credential_problem,
    host_problem,
    hostname_problem,
    key_problem,
    pair_problem,
    passphrase_problem,
    pin_problem,
    ssid_problem,
    token_problem,
)
from provisioning.tomlwrite import TomlLines

#: where the seed puts the gateway's files: the paths the Debian package expects
CONFIG_PATH = Path("/etc/citygate/gateway.toml")
KEY_PATH = Path("/etc/citygate/identity/gateway.key")
CERT_PATH = Path("/etc/citygate/identity/gateway.crt")
CA_PATH = Path("/etc/citygate/identity/ca.crt")
STATE_DIR = Path("/var/lib/citygate")
#: the TUF root metadata of the update repository (agent.config's ota.trusted_root)
UPDATE_ROOT_PATH = Path("/etc/citygate/update-root.json")

_TABLES = ("gateway", "network", "broker", "enrollment", "ota", "sensors")
_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_MAX_PEM_FILE = 1 << 20
_MAX_ROOT_FILE = 1 << 20
_MAX_NTP_SERVERS = 8


@dataclass(frozen=True, slots=True)
class Wifi:
    country: str  # ISO 3166-1 alpha-2: the radio's regulatory domain
    ssid: str
    passphrase: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Cellular:
    apn: str
    pin: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Site:
    """A checked site file: everything the seed is made of. Only `read_site` makes one."""

    source: Path
    gateway_id: str
    hostname: str
    timezone: str | None
    ntp_servers: tuple[str, ...]
    network: Wifi | Cellular
    ca_pem: str = field(repr=False)  # the CA bundle the gateway trusts (broker's, its own)
    token: str = field(repr=False)  # the one-time enrollment token
    claim_cert_pem: str = field(repr=False)  # authenticates the gateway to the registrar ...
    claim_key_pem: str = field(repr=False)  # ... until it has its own certificate
    enroll_port: int | None  # the broker's enrollment listener; None: enroll's default
    gateway_toml: str = field(repr=False)  # accepted by agent.config.load_config
    update_root_json: str | None = None  # the TUF root for UPDATE_ROOT_PATH; None: none shipped


# -- reading the file --------------------------------------------------------------------


def _fail(path: Path, line: int, key: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(str(path), line, key, message)])


def _parse(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, 0, "file", "no such file") from None
    except OSError as exc:
        raise _fail(path, 0, "file", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _fail(path, line, "syntax", "not valid UTF-8 text") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line = str(exc), 1
        if match := _TOML_AT.search(message):
            line = int(match.group(1))
            message = f"{message[: match.start()]} (column {match.group(2)})"
        raise _fail(path, line, "syntax", message) from None
    except RecursionError:
        raise _fail(path, 1, "syntax", "values nested too deeply") from None


def _table(report: Report, data: Mapping[str, Any], where: KeyPath) -> Table | None:
    """The table at `where` (its last part looked up in `data`); None if absent or not a table."""
    raw = data.get(where[-1])
    if raw is None:
        return None
    if not isinstance(raw, dict):
        report.add(where, f"expected a table, got {describe_type(raw)}")
        return None
    return Table(report, where, raw)


def _required_table(report: Report, data: Mapping[str, Any], name: str) -> Table:
    """The table `name`; if it is missing, one problem says so (not one per required key)."""
    table = _table(report, data, (name,))
    if table is None:
        if name not in data:
            report.add((name,), f"missing required table [{name}]")
        table = Table(Report(), (name,), {})  # its reads report into a report nobody reads
    return table


def _no_check(_: str) -> str | None:
    return None


# -- the tables -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Gateway:
    gateway_id: str
    hostname: str
    timezone: str | None
    ntp_servers: tuple[str, ...]


def hostname_for(gateway_id: str) -> str:
    """The host name a gateway id makes: lower case, runs of other characters become `-`."""
    name = re.sub(r"[^a-z0-9-]+", "-", gateway_id.lower()).strip("-")
    return name[:63].rstrip("-") or "citygate"


def _gateway_id_problem(value: str) -> str | None:
    if is_valid_gateway_id(value):
        return None
    return "must be 1 to 64 characters of A-Z a-z 0-9 . _ - (it becomes the certificate's CN)"


def _timezone_problem(name: str) -> str | None:
    if not zoneinfo.available_timezones():
        return None  # no time zone database on this machine: the gateway's will decide
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name!r}; use a name like 'Europe/Berlin' or 'UTC'"
    return None


def _gateway(report: Report, data: Mapping[str, Any]) -> _Gateway:
    table = _required_table(report, data, "gateway")
    gateway_id = table.text("id", None, check=_gateway_id_problem)
    hostname = table.text("hostname", hostname_for(gateway_id), check=hostname_problem)
    timezone = table.text("timezone", "", check=_timezone_problem) or None
    servers = _string_list(table, "ntp_servers", check=host_problem)
    table.finish()
    return _Gateway(gateway_id, hostname, timezone, servers)


def _string_list(table: Table, key: str, check: Check) -> tuple[str, ...]:
    table.read.append(key)
    raw = table.data.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        table.problem(key, "expected an array of strings")
        return ()
    if len(raw) > _MAX_NTP_SERVERS:
        table.problem(key, f"at most {_MAX_NTP_SERVERS} entries, got {len(raw)}")
    problems = [problem for item in raw if (problem := check(item))]
    if problems:
        table.problem(key, problems[0])
    return tuple(raw)


def _network(report: Report, data: Mapping[str, Any]) -> Wifi | Cellular:
    outer = _required_table(report, data, "network")
    outer.read.extend(("wifi", "cellular"))
    outer.finish()
    wifi = _table(report, outer.data, ("network", "wifi"))
    cellular = _table(report, outer.data, ("network", "cellular"))
    if wifi is not None and cellular is not None:
        report.add(("network", "cellular"), "give [network.wifi] or [network.cellular], not both")
    if cellular is not None:
        link: Wifi | Cellular = Cellular(
            apn=cellular.text("apn", None, check=apn_problem),
            pin=cellular.text("pin", "", check=pin_problem) or None,
            username=cellular.text("username", "", check=credential_problem) or None,
            password=cellular.text("password", "", check=credential_problem) or None,
        )
        cellular.finish()
        return link
    if wifi is None:
        if "network" in data and not report.has(("network",)):
            report.add(("network",), "add a [network.wifi] or a [network.cellular] table")
        return Wifi("", "", "")
    link = Wifi(
        country=wifi.text("country", None, check=country_problem),
        ssid=wifi.text("ssid", None, check=ssid_problem),
        passphrase=wifi.text("passphrase", None, check=passphrase_problem),
    )
    wifi.finish()
    return link


@dataclass(frozen=True, slots=True)
class _Broker:
    host: str
    port: int
    prefix: str | None
    ca_pem: str


def _broker(report: Report, data: Mapping[str, Any], base: Path) -> _Broker:
    table = _required_table(report, data, "broker")
    host = table.text("host", None, check=_no_check)  # load_config checks the name itself
    port = table.integer("port", 8883, 1, 65535)
    prefix = table.text("prefix", "", check=_no_check) or None  # also checked by load_config
    ca = _pem(table, "ca", base, check=certificates_problem)
    table.finish()
    return _Broker(host=host or "localhost", port=port, prefix=prefix, ca_pem=ca or "")


@dataclass(frozen=True, slots=True)
class _Enrollment:
    token: str
    claim_cert: str
    claim_key: str
    port: int | None


def _enrollment(
    report: Report, data: Mapping[str, Any], base: Path, gateway_id: str
) -> _Enrollment:
    table = _required_table(report, data, "enrollment")
    token = table.text("token", None, check=token_problem)
    cert = _pem(table, "claim_cert", base, check=certificates_problem)
    key = _pem(table, "claim_key", base, check=key_problem)
    port = table.integer("port", 0, 1, 65535)
    table.finish()
    if cert is not None and (problem := claim_problem(cert, gateway_id)):
        table.problem("claim_cert", problem)
    elif cert is not None and key is not None and (problem := pair_problem(cert, key)):
        table.problem("claim_key", problem)
    return _Enrollment(token, cert or "", key or "", port if "port" in table.data else None)


def _pem(table: Table, key: str, base: Path, *, check: Check) -> str | None:
    """A required PEM value: the text itself, or a file (relative to the site file's directory)."""
    value = table.text(key, None, check=_no_check)
    if not value:
        return None
    if value.lstrip().startswith("-----BEGIN"):
        text = value
    else:
        text, problem = _read_pem_file(base / value)
        if problem:
            table.problem(key, problem)
            return None
    text = "\n".join(line.rstrip() for line in text.strip().splitlines()) + "\n"
    if problem := check(text):
        table.problem(key, problem)
        return None
    return text


def _read_pem_file(path: Path) -> tuple[str, str | None]:
    """(the file's text, None), or ("", what is wrong)."""
    try:
        if not path.is_file():
            return "", f"not a file: {path}" if path.exists() else f"no such file {path}"
        if path.stat().st_size > _MAX_PEM_FILE:
            return "", f"{path} is larger than {_MAX_PEM_FILE} bytes: not a PEM file"
        return path.read_text(encoding="ascii"), None
    except UnicodeDecodeError:
        return "", f"{path} is not a PEM text file"
    except OSError as exc:
        return "", f"cannot read {path}: {exc.strerror or exc}"


@dataclass(frozen=True, slots=True)
class _Ota:
    repo: str | None
    channel: str | None
    hardware: str | None
    root_json: str | None


def _ota(report: Report, data: Mapping[str, Any], base: Path) -> _Ota:
    """The optional [ota] table: repository, channel and hardware go into the config as they
    are (load_config checks them); trusted_root is a file here, shipped to UPDATE_ROOT_PATH."""
    table = _table(report, data, ("ota",))
    if table is None:
        return _Ota(None, None, None, None)
    repo = table.text("repo", "", check=_no_check) or None
    channel = table.text("channel", "", check=_no_check) or None
    hardware = table.text("hardware", "", check=_no_check) or None
    root_file = table.text("trusted_root", "", check=_no_check)
    table.finish()
    root_json = None
    if root_file:
        root_json, problem = _update_root(base / root_file)
        if problem:
            table.problem("trusted_root", problem)
    elif repo is not None:
        table.problem(
            "repo",
            "needs trusted_root: the repository's TUF root metadata (metadata/1.root.json "
            "from `python -m images.repo init`), which the gateway starts trusting from",
        )
    return _Ota(repo, channel, hardware, root_json)


def _update_root(path: Path) -> tuple[str | None, str | None]:
    """(the root metadata's text, None), or (None, what is wrong with the file)."""
    data, problem = _read_small(path, _MAX_ROOT_FILE, "root metadata")
    if data is None:
        return None, problem
    if problem := _root_problem(path, data):
        return None, problem
    text = data.decode("utf-8").rstrip("\n") + "\n"
    if not text.isascii() or any(c < " " and c not in "\t\n" for c in text):
        return None, f"{path}: expected ASCII JSON without control characters (as images.repo)"
    return text, None


def _read_small(path: Path, limit: int, what: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, what is wrong)."""
    try:
        if not path.is_file():
            return None, f"not a file: {path}" if path.exists() else f"no such file {path}"
        if path.stat().st_size > limit:
            return None, f"{path} is larger than {limit} bytes: not {what}"
        return path.read_bytes(), None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"


def _root_problem(path: Path, data: bytes) -> str | None:
    """What keeps `data` from being TUF root metadata signed by its own root keys."""
    try:
        metadata = Metadata[Root].from_bytes(data)
    except DeserializationError as exc:
        return f"{path} is not TUF metadata ({exc.__cause__ or exc})"
    if not isinstance(metadata.signed, Root):
        return (
            f"{path} is {metadata.signed.type} metadata; give the repository's root "
            "metadata (metadata/N.root.json)"
        )
    try:
        metadata.signed.verify_delegate(Root.type, metadata.signed_bytes, metadata.signatures)
    except UnsignedMetadataError as exc:
        return f"{path} is not signed by a threshold of its own root keys: {exc}"
    return None


# -- the gateway config, checked by the agent's own loader ----------------------------------


def _gateway_config(site: Path, broker: _Broker, ota: _Ota, sensors: object) -> TomlLines:
    out = TomlLines()
    out.comment(f"citygate gateway config for this gateway, from the site file {site.name}")
    out.comment("(`citygate provision seed`); docs/sample-gateway.toml documents every key.")
    out.table(("gateway",))
    out.value(("gateway", "state_dir"), str(STATE_DIR))
    out.table(("identity",))
    out.value(("identity", "key"), str(KEY_PATH))
    out.value(("identity", "cert"), str(CERT_PATH))
    out.value(("identity", "ca"), str(CA_PATH))
    out.table(("broker",))
    out.value(("broker", "host"), broker.host)
    out.value(("broker", "port"), broker.port)
    if broker.prefix is not None:
        out.value(("broker", "prefix"), broker.prefix)
    settings = {
        "repo": ota.repo,
        "trusted_root": str(UPDATE_ROOT_PATH) if ota.root_json is not None else None,
        "channel": ota.channel,
        "hardware": ota.hardware,
    }
    if any(value is not None for value in settings.values()):
        out.table(("ota",))
        for key, value in settings.items():
            if value is not None:
                out.value(("ota", key), value)
    if isinstance(sensors, dict):
        for sensor_id, options in sensors.items():
            out.table(("sensors", sensor_id))
            for key, value in options.items() if isinstance(options, dict) else ():
                out.value(("sensors", sensor_id, key), value)
    return out


def _gateway_config_problems(config: TomlLines) -> list[tuple[KeyPath, str, str]]:
    """(key path in the config, key as printed, message) for each problem load_config finds."""
    with tempfile.TemporaryDirectory(prefix="citygate-seed-") as scratch:
        path = Path(scratch) / "gateway.toml"
        path.write_text(config.text())
        try:
            load_config(path)
        except ConfigError as exc:
            return [(config.key_at(issue.line), issue.key, issue.message) for issue in exc.issues]
    return []


def read_site(path: Path) -> Site:
    """Read and check the site file at `path`; raise ConfigError listing every problem."""
    text, data = _parse(path)
    report = Report()
    for name, value in data.items():
        if name not in _TABLES:
            kind = "table" if isinstance(value, dict) else "key"
            report.add((name,), f"unknown {kind}; expected one of: {', '.join(_TABLES)}")
    base = path.absolute().parent
    gateway = _gateway(report, data)
    network = _network(report, data)
    broker = _broker(report, data, base)
    enrollment = _enrollment(report, data, base, gateway.gateway_id)
    ota = _ota(report, data, base)
    sensors = data.get("sensors")
    if sensors is not None and not isinstance(sensors, dict):
        report.add(("sensors",), f"expected a table, got {describe_type(sensors)}")
    config = _gateway_config(path, broker, ota, sensors)
    _raise_problems(path, text, report, _gateway_config_problems(config))
    return Site(
        source=path.absolute(),
        gateway_id=gateway.gateway_id,
        hostname=gateway.hostname,
        timezone=gateway.timezone,
        ntp_servers=gateway.ntp_servers,
        network=network,
        ca_pem=broker.ca_pem,
        token=enrollment.token,
        claim_cert_pem=enrollment.claim_cert,
        claim_key_pem=enrollment.claim_key,
        enroll_port=enrollment.port,
        gateway_toml=config.text(),
        update_root_json=ota.root_json,
    )


def _raise_problems(
    path: Path, text: str, report: Report, config_problems: list[tuple[KeyPath, str, str]]
) -> None:
    """Raise ConfigError for the site's problems and the config's (those not reported already)."""
    lines = KeyLines(text)
    found = [(lines.line_of(where), render_key(where), msg) for where, msg in report.problems]
    reported = {key for _, key, _ in found}
    found += [
        (lines.line_of(where), key, message)
        for where, key, message in config_problems
        if key not in reported
    ]
    if found:
        found.sort(key=lambda item: item[0])
        raise ConfigError([ConfigIssue(str(path), line, key, msg) for line, key, msg in found])
