"""The `[sensors.<id>]` table of a Modbus device: which bus, which register map, which overrides.

A sensor names its bus with `port` (a serial device, or ``tcp://HOST:PORT``)
and its register map with either `profile` (a shipped name or a TOML file) or
an inline `registers` array. Keys such as `unit_id`, `baud`, `period_s`,
`timeout_ms` or `word_order` override the map's defaults for this one device.

Trust: the table is unverified until `parse_options` accepts it; every
problem raises `OptionError` naming the key. Whether the port exists is
checked by `citygate config check` / `doctor`, not here. Settings that must
agree between sensors on one bus (baud, parity, stop bits) are compared when
the bus is shared at run time (`drivers.modbus.bus.BusRegistry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import OptionError
from drivers.modbus import codec
from drivers.modbus.profile import (
    PARITIES,
    Profile,
    ProfileError,
    load_profile,
    profile_from_table,
    read_baud,
    read_choice,
    read_integer,
    read_number,
)

TCP_PREFIX = "tcp://"

# the keys that override a map's device settings: key -> Profile attribute
_OVERRIDES = (
    "unit_id", "baud", "parity", "stop_bits", "period_s", "max_registers", "max_gap",
    "min_idle_ms", "timeout_ms", "retries", "warmup_s", "word_order",
)  # fmt: skip
_KNOWN = frozenset({"driver", "port", "profile", "registers", *_OVERRIDES})


@dataclass(frozen=True, slots=True)
class BusSettings:
    """What identifies and configures one physical bus; sensors with equal `port` share it."""

    port: str
    baud: int = 9600
    parity: str = "N"
    stop_bits: int = 1

    @property
    def is_tcp(self) -> bool:
        return self.port.startswith(TCP_PREFIX)

    @property
    def host(self) -> str:
        return self.port[len(TCP_PREFIX) :].rpartition(":")[0].strip("[]")

    @property
    def tcp_port(self) -> int:
        return int(self.port.rpartition(":")[2])

    def describe(self) -> str:
        if self.is_tcp:
            return self.port
        return f"{self.port} at {self.baud} {8}{self.parity}{self.stop_bits}"


@dataclass(frozen=True, slots=True)
class ModbusOptions:
    """A validated Modbus sensor: its bus and its register map with this device's settings."""

    bus: BusSettings
    profile: Profile

    @property
    def unit_id(self) -> int:
        return self.profile.unit_id

    @property
    def period_s(self) -> float:
        return self.profile.period_s


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> ModbusOptions:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    for key in table:
        if key not in _KNOWN:
            raise OptionError(key, f"unknown option for modbus sensor {sensor_id!r}")
    port = _port(table.get("port"))
    has_profile, has_registers = "profile" in table, "registers" in table
    if has_profile == has_registers:
        raise OptionError(
            "profile", "give either profile (a shipped name or a TOML file) or registers, not both"
        )
    overrides = {key: table[key] for key in _OVERRIDES if key in table}
    if has_profile:
        profile = _named_profile(table["profile"], overrides)
    else:
        profile = _inline_profile(sensor_id, table["registers"], overrides)
    if port.startswith(TCP_PREFIX):
        bus = BusSettings(port)
    else:
        bus = BusSettings(port, profile.baud, profile.parity, profile.stop_bits)
    return ModbusOptions(bus=bus, profile=profile)


def _port(value: object) -> str:
    if value is None:
        raise OptionError(
            "port", "missing: a serial device such as /dev/ttyUSB0, or tcp://HOST:PORT"
        )
    if not isinstance(value, str) or not value.strip():
        raise OptionError("port", "must be a serial device path or tcp://HOST:PORT")
    if value.startswith(TCP_PREFIX):
        host, _, number = value[len(TCP_PREFIX) :].rpartition(":")
        if not host or not number.isdigit() or not 1 <= int(number) <= 65535:
            raise OptionError("port", f"{value!r} is not tcp://HOST:PORT with a port 1-65535")
    elif "://" in value:
        raise OptionError("port", f"{value!r}: only serial device paths and tcp:// are supported")
    return value


def _named_profile(name: object, overrides: Mapping[str, Any]) -> Profile:
    if not isinstance(name, str) or not name:
        raise OptionError("profile", "must be a profile name (such as sdm120) or a TOML file path")
    try:
        profile = load_profile(name)
    except ProfileError as exc:
        raise OptionError("profile", exc.message) from None
    return _apply(profile, overrides)


def _inline_profile(sensor_id: str, registers: object, overrides: Mapping[str, Any]) -> Profile:
    table = {**overrides, "registers": registers}
    try:
        return profile_from_table(sensor_id, table)
    except ProfileError as exc:
        key, _, rest = exc.key.partition("[")
        key = key.partition(".")[0]
        if rest:  # registers[3].type -> key "registers", message "[3].type: ..."
            raise OptionError(key, f"[{rest}: {exc.message}") from None
        raise OptionError(key, exc.message) from None


def _apply(profile: Profile, overrides: Mapping[str, Any]) -> Profile:
    """The profile with this sensor's overrides, each checked like the profile key it replaces."""
    changes: dict[str, Any] = {}
    try:
        for key, value in overrides.items():
            attribute, check = _OVERRIDE_CHECKS[key]
            changes[attribute] = check({key: value}, key)
        return profile.with_settings(**changes)
    except ProfileError as exc:
        raise OptionError(exc.key, exc.message) from None


def _gaps(table: Mapping[str, Any], key: str) -> dict[int, int]:
    gap = read_integer(table, key, 0, 0, codec.MAX_READ_REGISTERS)
    return dict.fromkeys(codec.READ_FUNCTIONS, gap)


def _ms(low: float, high: float) -> Callable[[Mapping[str, Any], str], float]:
    return lambda table, key: read_number(table, key, 0.0, low, high) / 1000.0


# override key -> (Profile attribute, check of {key: value})
_OVERRIDE_CHECKS: dict[str, tuple[str, Callable[[Mapping[str, Any], str], Any]]] = {
    "unit_id": ("unit_id", lambda t, k: read_integer(t, k, 1, 0, 255)),
    "baud": ("baud", lambda t, k: read_baud(t[k])),
    "parity": ("parity", lambda t, k: read_choice(t, k, PARITIES, "N")),
    "stop_bits": ("stop_bits", lambda t, k: read_integer(t, k, 1, 1, 2)),
    "period_s": ("period_s", lambda t, k: read_number(t, k, 10.0, 0.05, 86400.0)),
    "max_registers": ("max_registers", lambda t, k: read_integer(t, k, 125, 1, 125)),
    "max_gap": ("max_gaps", _gaps),
    "min_idle_ms": ("min_idle_s", _ms(0.0, 10000.0)),
    "timeout_ms": ("timeout_s", _ms(1.0, 60000.0)),
    "retries": ("retries", lambda t, k: read_integer(t, k, 1, 0, 10)),
    "warmup_s": ("warmup_s", lambda t, k: read_number(t, k, 0.0, 0.0, 86400.0)),
    "word_order": ("word_order", lambda t, k: read_choice(t, k, codec.WORD_ORDERS, "ABCD")),
}
