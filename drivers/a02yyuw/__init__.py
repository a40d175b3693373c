"""DFRobot A02YYUW and JSN-SR04T ultrasonic sensors (serial ``FF H L SUM``): public names."""

from __future__ import annotations

from drivers.a02yyuw.codec import FrameError, StreamParser, decode, decode_model
from drivers.a02yyuw.driver import A02yyuwFamily, A02yyuwOptions, parse_options
from drivers.a02yyuw.emulator import A02yyuwEmulator
from drivers.base import DriverFamily

FAMILY: DriverFamily = A02yyuwFamily()

__all__ = [
    "FAMILY",
    "A02yyuwEmulator",
    "A02yyuwFamily",
    "A02yyuwOptions",
    "FrameError",
    "StreamParser",
    "decode",
    "decode_model",
    "parse_options",
]
