"""Rig descriptions: which sensors a HIL rig has, on which transport, and what it can break.

A rig is one TOML file (hil_tests/README.md documents the format):

    [rig]
    kind = "emulated"                  # or "real"
    faults = ["network", "broker", ...]

    [sensors.air_1]
    family = "pms5003"
    transport = "serial"
    [sensors.air_1.options]            # the agent's driver options, as in gateway.toml
    mode = "active"

An emulated rig gets its sensors from the drivers' emulators (the rig makes
the ports and addresses); a real rig names the hardware (`port`, `address`,
`unit_id`, `profile`). `load_rig` checks everything, including each sensor's
driver options through the driver family itself, and raises one `RigError`
listing every problem as FILE:LINE: KEY: MESSAGE, the way `citygate config
check` reports a gateway config.

Trust: the file is input written by people; nothing from it is used unchecked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent._tomlpos import KeyLines, KeyPath, Report, Table, describe_type, render_key
from agent.config import ConfigError, ConfigIssue, read_toml
from drivers import OptionError, family, family_names
from drivers.modbus import shipped_profiles

KINDS = ("emulated", "real")
#: injectors a rig may offer; "sensors" (unplug, noise, silence, ...) needs emulated sensors
FAULTS = ("network", "broker", "power", "disk", "clock", "sensors")
#: the transports each family can be reached over
TRANSPORTS: Mapping[str, tuple[str, ...]] = {
    "pms5003": ("serial",),
    "sds011": ("serial",),
    "sps30": ("serial",),
    "maxbotix": ("serial",),
    "a02yyuw": ("serial",),
    "modbus": ("modbus-rtu", "modbus-tcp"),
    "ruuvi": ("ble",),
    "bthome": ("ble",),
}
#: what stands in for the port or address of an emulated sensor while its options are checked
_PLACEHOLDER_PORT = {"serial": "/dev/ttyHIL0", "modbus-rtu": "/dev/ttyHIL0"}
_TCP_PLACEHOLDER = "tcp://127.0.0.1:502"
#: keys of [sensors.<id>.options] that the rig sets itself
_RIG_OWNED = ("driver", "port", "address", "profile", "unit_id")
_SENSOR_KEYS = (
    "family", "transport", "port", "address", "profile", "unit_id", "bus", "seed", "period_s",
    "options",
)  # fmt: skip
_LABELS = {"serial": "serial", "modbus-rtu": "Modbus RTU", "modbus-tcp": "Modbus TCP", "ble": "BLE"}
_SENSOR_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TABLES = ("rig", "sensors")


class RigError(ConfigError):
    """The rig file cannot be used; `issues` lists every problem, in line order."""


@dataclass(frozen=True)
class SensorSpec:
    """One sensor of a rig. `port`/`address` are None for an emulated sensor (the rig makes
    them); `bus` groups emulated Modbus sensors onto one emulated line or server."""

    sensor_id: str
    family: str
    transport: str
    port: str | None = None
    address: str | None = None
    profile: str | None = None
    unit_id: int | None = None
    bus: str = "bus"
    seed: int = 0
    period_s: float = 1.0
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class RigSpec:
    name: str
    kind: str
    source: Path
    faults: frozenset[str]
    first_reading_s: float  # how long a scenario waits for a sensor's first reading
    sensors: tuple[SensorSpec, ...]
    description: str = ""

    @property
    def emulated(self) -> bool:
        return self.kind == "emulated"

    def supports(self, fault: str) -> bool:
        return fault in self.faults

    def sensor(self, sensor_id: str) -> SensorSpec:
        for sensor in self.sensors:
            if sensor.sensor_id == sensor_id:
                return sensor
        raise KeyError(sensor_id)


def load_rig(path: Path) -> RigSpec:
    """Read and check the rig file at `path`; raise RigError listing every problem."""
    try:
        text, data = read_toml(path)
    except ConfigError as exc:
        raise RigError(exc.issues) from None
    report = Report()
    for name, value in data.items():
        if name == "broker":
            report.add(
                (name,), "the broker is always the local mosquitto the rig starts: remove it"
            )
        elif name not in _TABLES:
            kind = "table" if isinstance(value, dict) else "key"
            report.add((name,), f"unknown {kind}; expected one of: {', '.join(_TABLES)}")
    rig = _table(report, data, ("rig",))
    kind = rig.choice("kind", "emulated", KINDS) if "kind" in rig.data else ""
    if not kind:
        rig.problem("kind", f"missing required key: one of {', '.join(KINDS)}")
        kind = "emulated"
    name = rig.text("name", path.stem, lambda s: None if s else "empty name")
    description = rig.text("description", "", lambda _: None)
    faults = _faults(rig, kind)
    first_reading_s = rig.number("first_reading_s", 30.0, at_most=3600.0)
    rig.finish()
    sensors = _sensors(report, data.get("sensors"), kind)
    if report.problems:
        lines = KeyLines(text)
        issues = [
            ConfigIssue(str(path), lines.line_of(where), render_key(where), message)
            for where, message in report.problems
        ]
        issues.sort(key=lambda issue: issue.line)
        raise RigError(issues)
    return RigSpec(name, kind, path.absolute(), faults, first_reading_s, sensors, description)


def _table(report: Report, data: Mapping[str, Any], where: KeyPath) -> Table:
    raw = data.get(where[-1], {})
    if not isinstance(raw, dict):
        report.add(where, f"expected a table, got {describe_type(raw)}")
        raw = {}
    return Table(report, where, raw)


def _faults(rig: Table, kind: str) -> frozenset[str]:
    default = FAULTS if kind == "emulated" else tuple(f for f in FAULTS if f != "sensors")
    raw = rig.data.get("faults", list(default))
    rig.read.append("faults")
    if not isinstance(raw, list) or not all(isinstance(f, str) for f in raw):
        rig.problem("faults", f"expected a list of strings, got {describe_type(raw)}")
        return frozenset()
    for fault in raw:
        if fault not in FAULTS:
            rig.problem("faults", f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        elif fault == "sensors" and kind == "real":
            rig.problem("faults", "a real sensor has no fault injector: remove 'sensors'")
    return frozenset(raw)


def _sensors(report: Report, raw: object, kind: str) -> tuple[SensorSpec, ...]:
    if raw is None:
        report.add(("sensors",), "a rig needs at least one sensor: add a [sensors.<id>] table")
        return ()
    if not isinstance(raw, dict):
        report.add(("sensors",), f"expected a table, got {describe_type(raw)}")
        return ()
    found = [
        _sensor(report, sensor_id, table, kind, index)
        for index, (sensor_id, table) in enumerate(raw.items())
    ]
    return tuple(sensor for sensor in found if sensor is not None)


def _sensor(
    report: Report, sensor_id: str, raw: object, kind: str, index: int
) -> SensorSpec | None:
    where = ("sensors", sensor_id)
    if not _SENSOR_ID.fullmatch(sensor_id):
        report.add(where, "sensor id must be 1 to 32 characters of A-Z a-z 0-9 _ -")
    if not isinstance(raw, dict):
        report.add(where, f"expected a table, got {describe_type(raw)}")
        return None
    table = Table(report, where, raw)
    known = family_names()
    fam = table.text("family", None, lambda f: None if f in known else _unknown_family(f))
    transport = table.text("transport", None, lambda _: None)
    if table.ok("family", "transport") and fam in known:
        allowed = TRANSPORTS.get(fam, ())
        if not allowed:
            table.problem("family", f"the HIL rig cannot host {fam!r} sensors yet")
        elif transport not in allowed:
            table.problem("transport", f"{fam} is reached over {' or '.join(allowed)}")
    emulated = kind == "emulated"
    port = _endpoint(table, "port", transport, emulated)
    address = _endpoint(table, "address", transport, emulated)
    profile = _profile(table, fam)
    unit_id = table.integer("unit_id", 0, 1, 247) if "unit_id" in raw else None
    if unit_id is not None and fam != "modbus":
        table.problem("unit_id", "only Modbus sensors have a unit id")
    bus = table.text("bus", "bus", lambda s: None if s else "empty bus")
    seed = table.integer("seed", index, 0, None)
    period_s = table.number("period_s", 1.0, at_most=3600.0)
    _emulator_only(table, fam, emulated)
    options = _options(table, raw.get("options", {}))
    table.read = list(_SENSOR_KEYS)  # name every key of the schema in an unknown-key message
    table.finish()
    if any(problem[:2] == where for problem, _ in report.problems):
        return None
    if emulated and transport == "ble" and address is None:
        address = _emulated_address(sensor_id)
    spec = SensorSpec(
        sensor_id, fam, transport, port, address, profile, unit_id, bus, seed, period_s, options
    )
    _check_options(report, spec)
    return spec


def _unknown_family(name: str) -> str:
    return f"unknown family {name!r}; known: {', '.join(family_names())}"


def _endpoint(table: Table, key: str, transport: str, emulated: bool) -> str | None:
    """`port` (serial, Modbus) or `address` (BLE): required on a real rig, made by an emulated
    one (where a BLE address may be chosen)."""
    wanted = "address" if transport == "ble" else "port"
    if key not in table.data:
        table.read.append(key)
        if key == wanted and not emulated:
            label = _LABELS.get(transport, transport)
            table.problem(key, f"missing required key: where the real {label} sensor is")
        return None
    value = table.text(key, None, lambda s: None if s else f"empty {key}")
    if key != wanted:
        table.problem(
            key, f"a {_LABELS.get(transport, transport)} sensor has no {key}; it has {wanted}"
        )
    elif emulated and key == "port":
        table.problem(
            key, 'an emulated sensor\'s port is made by the rig: remove it (or kind = "real")'
        )
    elif transport == "modbus-tcp" and not value.startswith("tcp://"):
        table.problem(key, f"a Modbus TCP port looks like tcp://HOST:PORT, got {value!r}")
    return value


def _profile(table: Table, fam: str) -> str | None:
    if fam == "modbus":
        if "profile" not in table.data:
            shipped = ", ".join(shipped_profiles())
            table.problem("profile", f"missing required key: a register map ({shipped}, or a file)")
            return None
        return table.text("profile", None, lambda s: None if s else "empty profile")
    if "profile" in table.data:
        table.read.append("profile")
        table.problem("profile", "only Modbus sensors have a register profile")
    return None


def _emulator_only(table: Table, fam: str, emulated: bool) -> None:
    """`bus`, `seed` and `period_s` describe emulators: wrong on a real rig, `bus` only for
    Modbus, and an emulator period only for serial and BLE sensors."""
    for key in ("bus", "seed", "period_s"):
        if key not in table.data:
            continue
        if not emulated:
            table.problem(key, f"only an emulated sensor has a {key}: remove it")
        elif key == "bus" and fam != "modbus":
            table.problem(key, "only Modbus sensors share an emulated bus")
        elif key == "period_s" and fam == "modbus":
            table.problem(key, "a Modbus poll period is a driver option: options.period_s")


def _options(table: Table, raw: object) -> dict[str, object]:
    table.read.append("options")
    if not isinstance(raw, dict):
        table.problem("options", f"expected a table, got {describe_type(raw)}")
        return {}
    for key in raw:
        if key in _RIG_OWNED:
            where = (*table.where, "options", key)
            table.report.add(where, "set by the rig from the sensor's own keys: remove it here")
    return dict(raw)


def _emulated_address(sensor_id: str) -> str:
    """A stable, locally administered address for an emulated BLE device."""
    digest = hashlib.sha256(sensor_id.encode()).digest()
    return ":".join(f"{b:02X}" for b in (0xC2, 0x1F, *digest[:4]))


def agent_table(
    spec: SensorSpec, *, port: str | None = None, address: str | None = None
) -> dict[str, object]:
    """The sensor's `[sensors.<id>]` table for the agent, with the port or address it is on."""
    table: dict[str, object] = {"driver": spec.family}
    if spec.transport == "ble":
        table["address"] = address or spec.address
    else:
        table["port"] = port or spec.port
    if spec.profile is not None:
        table["profile"] = spec.profile
    if spec.unit_id is not None:
        table["unit_id"] = spec.unit_id
    table.update(spec.options)
    return table


def _check_options(report: Report, spec: SensorSpec) -> None:
    """Let the driver family judge the options now, not when the agent refuses to start."""
    placeholder = (
        _TCP_PLACEHOLDER
        if spec.transport == "modbus-tcp"
        else _PLACEHOLDER_PORT.get(spec.transport)
    )
    table = agent_table(spec, port=spec.port or placeholder)
    table.pop("bin", None)  # the agent's pipeline checks a bin's geometry, not the driver
    where = ("sensors", spec.sensor_id)
    try:
        family(spec.family).parse_options(spec.sensor_id, table)
    except OptionError as exc:
        key = (*where, "options", exc.key) if exc.key in spec.options else (*where, exc.key)
        report.add(key, exc.message)
    except (ValueError, TypeError) as exc:
        report.add((*where, "options"), f"driver {spec.family!r} rejected the options: {exc}")
