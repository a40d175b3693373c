"""Nova Fitness SDS011 particulate sensor (serial, 10-byte frames): the family's public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.sds011.codec import FrameError, StreamParser
from drivers.sds011.driver import Sds011Driver, Sds011Family, Sds011Options, parse_options
from drivers.sds011.emulator import Sds011Emulator

FAMILY: DriverFamily = Sds011Family()

__all__ = [
    "FAMILY",
    "FrameError",
    "Sds011Driver",
    "Sds011Emulator",
    "Sds011Family",
    "Sds011Options",
    "StreamParser",
    "parse_options",
]
