"""Bind the A02YYUW / JSN-SR04T codec to a serial port and, in triggered mode, a schedule.

In `auto` mode (A02YYUW; JSN-SR04T mode 2) the sensor sends a frame every
100-300 ms by itself and the driver only listens. In `triggered` mode
(JSN-SR04T mode 3, 120 kOhm on R27) the driver sends the trigger byte 0x55
every `poll_interval_s` and the sensor answers with one frame. The port
itself (open, reopen with backoff, silence) is `drivers.uart.SerialDriver`'s.
Frames outside the measuring range, and 0 (no echo), become
`Decoded([], note)`: counted, never published as a distance.

Trust: the config table is unverified until `parse_options` accepts it; the
bytes from the port are unverified until the codec accepts a frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.a02yyuw import codec
from drivers.base import Decoded, Driver, OptionError
from drivers.uart import BaseProtocol, SerialDriver, SerialLink, SerialSettings, options

MODELS = tuple(codec.MODELS)  # a02yyuw, jsn_sr04t
MODES = ("auto", "triggered")
_KNOWN = ("port", "baud", "model", "mode", "poll_interval_s", "silence_timeout_s")


@dataclass(frozen=True, slots=True)
class A02yyuwOptions:
    """Validated settings of one sensor (see README.md, "Settings")."""

    port: str
    model: str = "a02yyuw"
    mode: str = "auto"
    baud: int = 9600
    poll_interval_s: float = 1.0
    silence_timeout_s: float = 5.0


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> A02yyuwOptions:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    options.reject_unknown("a02yyuw", sensor_id, table, _KNOWN)
    d = A02yyuwOptions(port="")
    result = A02yyuwOptions(
        port=options.port(table),
        model=options.choice(table, "model", d.model, MODELS),
        mode=options.choice(table, "mode", d.mode, MODES),
        baud=options.baud(table, d.baud),
        poll_interval_s=options.seconds(table, "poll_interval_s", d.poll_interval_s, 0.1, 86400),
        silence_timeout_s=options.seconds(
            table, "silence_timeout_s", d.silence_timeout_s, 0.5, 86400
        ),
    )
    if result.mode == "triggered" and result.model != "jsn_sr04t":
        raise OptionError("mode", '"triggered" is the JSN-SR04T\'s mode 3: set model = "jsn_sr04t"')
    if result.mode == "triggered" and result.silence_timeout_s <= result.poll_interval_s:
        raise OptionError("silence_timeout_s", "must be longer than poll_interval_s")
    return result


class A02yyuwProtocol(BaseProtocol):
    """Frames in, distances or flagged notes out; the trigger byte out in triggered mode."""

    def __init__(self, opts: A02yyuwOptions) -> None:
        self.parser = codec.StreamParser(opts.model)
        self.triggers = 0
        self._triggered = opts.mode == "triggered"
        self._notes: dict[str, int] = {
            codec.NO_ECHO: 0,
            codec.BELOW_RANGE: 0,
            codec.BEYOND_RANGE: 0,
        }

    def connected(self, link: SerialLink) -> None:
        self.parser.reset()

    def poll(self, link: SerialLink) -> float | None:
        if self._triggered:
            link.write(codec.TRIGGER)
            self.triggers += 1
        return None

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        out: list[Decoded] = []
        for records, note in self.parser.feed(data):
            if note:
                self._notes[note] += 1
            out.append(Decoded(records, note))
        return out

    def counters(self) -> Mapping[str, int]:
        p = self.parser
        return {
            "frames": p.frames,
            "bad_frames": p.bad_frames,
            "bad_bytes": p.bad_bytes,
            "no_echo": self._notes[codec.NO_ECHO],
            "below_range": self._notes[codec.BELOW_RANGE],
            "beyond_range": self._notes[codec.BEYOND_RANGE],
            "triggers": self.triggers,
        }


def create(sensor_id: str, opts: A02yyuwOptions) -> SerialDriver:
    settings = SerialSettings(
        port=opts.port,
        baud=opts.baud,
        silence_timeout_s=opts.silence_timeout_s,
        poll_interval_s=opts.poll_interval_s if opts.mode == "triggered" else None,
    )
    return SerialDriver(sensor_id, settings, A02yyuwProtocol(opts))


class A02yyuwFamily:
    """The registry's view of the family: option parsing, construction, one-frame decoding."""

    name = "a02yyuw"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> A02yyuwOptions:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, A02yyuwOptions):
            raise TypeError(f"expected A02yyuwOptions, got {type(options).__name__}")
        return create(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        """One frame; the range check uses `params["model"]` (or `--profile`), else a02yyuw."""
        model = params.get("model") or params.get("profile") or "a02yyuw"
        records, note = codec.decode_model(data, model)
        return Decoded(records, note)
