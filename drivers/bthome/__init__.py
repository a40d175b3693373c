"""BTHome v2 BLE sensors (service data 0xFCD2, optionally AES-CCM encrypted): public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.bthome.driver import (
    BTHomeDriver,
    BTHomeFamily,
    BTHomeOptions,
    BTHomePayloads,
    parse_options,
)
from drivers.bthome.emulator import BTHomeEmulator

FAMILY: DriverFamily = BTHomeFamily()

__all__ = [
    "FAMILY",
    "BTHomeDriver",
    "BTHomeEmulator",
    "BTHomeFamily",
    "BTHomeOptions",
    "BTHomePayloads",
    "parse_options",
]
