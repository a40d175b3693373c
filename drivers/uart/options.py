"""Checks for the config keys every serial family shares: port, baud, timings.

Each function takes the sensor's raw config table (unverified, straight from
TOML) and returns a typed value or raises `OptionError` naming the key, so a
family's `parse_options` reads as a list of keys.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from drivers.base import OptionError

BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


def reject_unknown(
    family: str, sensor_id: str, table: Mapping[str, Any], known: Collection[str]
) -> None:
    """Raise for the first key that is neither `driver` nor in `known`."""
    for key in table:
        if key != "driver" and key not in known:
            raise OptionError(key, f"unknown option for {family} sensor {sensor_id!r}")


def port(table: Mapping[str, Any]) -> str:
    """The required `port`: a non-empty device path (its existence is checked elsewhere)."""
    if "port" not in table:
        raise OptionError("port", "missing: the serial device the sensor is wired to")
    value = table["port"]
    if not isinstance(value, str) or not value.strip():
        raise OptionError("port", "must be a non-empty device path such as /dev/ttyAMA0")
    return value


def baud(table: Mapping[str, Any], default: int, allowed: Collection[int] = BAUD_RATES) -> int:
    """`baud`, one of `allowed`; the message names the sensor's own rate (`default`)."""
    value = table.get("baud", default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError("baud", f"must be an integer, got {type(value).__name__}")
    if value not in allowed:
        raise OptionError("baud", f"must be one of {list(allowed)} (the sensor uses {default})")
    return value


def seconds(table: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    """A duration in seconds within [low, high]."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(key, f"must be a number of seconds, got {type(value).__name__}")
    if not low <= value <= high:
        raise OptionError(key, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def choice(table: Mapping[str, Any], key: str, default: str, allowed: Collection[str]) -> str:
    """A string option that must be one of `allowed`."""
    value = table.get(key, default)
    if value not in allowed:
        quoted = [f'"{a}"' for a in allowed]
        names = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise OptionError(key, f"must be {names}, got {value!r}")
    return str(value)


def flag(table: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean option (TOML true/false, nothing else)."""
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise OptionError(key, f"must be true or false, got {value!r}")
    return value
