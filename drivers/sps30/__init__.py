"""Sensirion SPS30 particulate sensor (UART, SHDLC frames): the family's public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.sps30.codec import FrameError, StreamParser
from drivers.sps30.driver import Sps30Driver, Sps30Family, Sps30Options, parse_options
from drivers.sps30.emulator import Sps30Emulator

FAMILY: DriverFamily = Sps30Family()

__all__ = [
    "FAMILY",
    "FrameError",
    "Sps30Driver",
    "Sps30Emulator",
    "Sps30Family",
    "Sps30Options",
    "StreamParser",
    "parse_options",
]
