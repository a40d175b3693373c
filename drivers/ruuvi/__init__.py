"""Ruuvi BLE sensors (RuuviTag data format 5, Ruuvi Air format 6): the family's public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.ruuvi.driver import (
    RuuviDriver,
    RuuviFamily,
    RuuviOptions,
    RuuviPayloads,
    parse_options,
)
from drivers.ruuvi.emulator import RuuviEmulator

FAMILY: DriverFamily = RuuviFamily()

__all__ = [
    "FAMILY",
    "RuuviDriver",
    "RuuviEmulator",
    "RuuviFamily",
    "RuuviOptions",
    "RuuviPayloads",
    "parse_options",
]
