"""Bind the MaxBotix codec to a serial port: the sensor talks, the driver listens.

MaxSonar sensors in free-run mode send a frame every 100-200 ms and never
need a command, so this is only a protocol object on `drivers.uart.SerialDriver`
(which owns the port, reopens it and notices silence) plus the options. The
model's no-target value is passed on as `Decoded([], "no echo")`: it proves
the sensor alive and is counted (`no_echo`), but it is not a distance.

Trust: the config table is unverified until `parse_options` accepts it; the
bytes from the port are unverified until the codec accepts a frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import Decoded, Driver, OptionError
from drivers.maxbotix import codec
from drivers.uart import BaseProtocol, SerialDriver, SerialLink, SerialSettings, options

MODELS = tuple(codec.MODELS)  # hrxl, hrxl_10m, xl, lv
_KNOWN = ("port", "baud", "model", "silence_timeout_s")


@dataclass(frozen=True, slots=True)
class MaxbotixOptions:
    """Validated settings of one MaxSonar (see README.md, "Settings")."""

    port: str
    model: str
    baud: int = 9600
    silence_timeout_s: float = 5.0


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> MaxbotixOptions:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    options.reject_unknown("maxbotix", sensor_id, table, _KNOWN)
    port = options.port(table)
    if "model" not in table:
        raise OptionError("model", f"missing: one of {', '.join(MODELS)} (it fixes the unit)")
    d = MaxbotixOptions(port="", model="")
    return MaxbotixOptions(
        port=port,
        model=options.choice(table, "model", "", MODELS),
        baud=options.baud(table, d.baud),
        silence_timeout_s=options.seconds(
            table, "silence_timeout_s", d.silence_timeout_s, 0.5, 86400
        ),
    )


class MaxbotixProtocol(BaseProtocol):
    """Frames in, distances out; the no-target value becomes a "no echo" note."""

    def __init__(self, model: str) -> None:
        self.parser = codec.StreamParser(model)

    def connected(self, link: SerialLink) -> None:
        self.parser.reset()

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        return [Decoded(records, note) for records, note in self.parser.feed(data)]

    def counters(self) -> Mapping[str, int]:
        p = self.parser
        return {
            "frames": p.frames,
            "no_echo": p.no_echo,
            "bad_frames": p.bad_frames,
            "bad_bytes": p.bad_bytes,
        }


def create(sensor_id: str, opts: MaxbotixOptions) -> SerialDriver:
    settings = SerialSettings(
        port=opts.port, baud=opts.baud, silence_timeout_s=opts.silence_timeout_s
    )
    return SerialDriver(sensor_id, settings, MaxbotixProtocol(opts.model))


class MaxbotixFamily:
    """The registry's view of the family: option parsing, construction, one-frame decoding."""

    name = "maxbotix"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> MaxbotixOptions:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, MaxbotixOptions):
            raise TypeError(f"expected MaxbotixOptions, got {type(options).__name__}")
        return create(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        """One frame; the model comes from `params["model"]` (or `--profile`), else `auto`."""
        model = params.get("model") or params.get("profile") or "auto"
        records = codec.decode_model(data, model)
        return Decoded(records) if records else Decoded([], codec.NO_ECHO)
