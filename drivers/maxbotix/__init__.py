"""MaxBotix MaxSonar ultrasonic rangefinders (serial ASCII ``R<digits>\\r``): public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.maxbotix.codec import FrameError, StreamParser, decode, decode_model
from drivers.maxbotix.driver import MaxbotixFamily, MaxbotixOptions, parse_options
from drivers.maxbotix.emulator import MaxbotixEmulator

FAMILY: DriverFamily = MaxbotixFamily()

__all__ = [
    "FAMILY",
    "FrameError",
    "MaxbotixEmulator",
    "MaxbotixFamily",
    "MaxbotixOptions",
    "StreamParser",
    "decode",
    "decode_model",
    "parse_options",
]
