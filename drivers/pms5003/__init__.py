"""Plantower PMS5003 particulate sensor (serial, 32-byte frames): the family's public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.pms5003.codec import StreamParser, command, decode_frame, parse_command
from drivers.pms5003.driver import Pms5003Driver, Pms5003Family, Pms5003Options, parse_options
from drivers.pms5003.emulator import Pms5003Emulator

FAMILY: DriverFamily = Pms5003Family()

__all__ = [
    "FAMILY",
    "Pms5003Driver",
    "Pms5003Emulator",
    "Pms5003Family",
    "Pms5003Options",
    "StreamParser",
    "command",
    "decode_frame",
    "parse_command",
    "parse_options",
]
