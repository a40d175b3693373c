"""The registry of device families: config key == folder name == registry key."""

from __future__ import annotations

import importlib

from drivers.base import DriverFamily

# one line per family, in the order `citygate decode --help` lists them
_FAMILIES = (
    "maxbotix",
    "a02yyuw",
    "pms5003",
    "sds011",
    "sps30",
    "ruuvi",
    "bthome",
    "modbus",
)


def family_names() -> tuple[str, ...]:
    return _FAMILIES


def family(name: str) -> DriverFamily:
    """Return the family registered as `name`; KeyError if there is none."""
    if name not in _FAMILIES:
        raise KeyError(name)
    module = importlib.import_module(f"drivers.{name}")
    fam: DriverFamily = module.FAMILY
    return fam
