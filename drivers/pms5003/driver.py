"""Bind the PMS5003 codec to a serial port and a schedule under asyncio.

The port itself (pyserial, `loop.add_reader`, reopen with backoff, silence)
belongs to `drivers.uart.SerialDriver`; this module is the sensor's protocol
on top of it: the mode command on every open, a wake command, passive reads
every `poll_interval_s`, sleep and wake on request, optional sleep between
passive reads, and the warm-up discard after a wake (frames within
`warmup_s` are dropped and counted; all-zero frames right after a wake are
warm-up too).

Trust: the config table is unverified until `parse_options` accepts it; the
bytes from the port are unverified until the codec accepts a frame. The port's
existence is not checked here (the config layer does that).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import Decoded, Driver, DriverState, Emit, OptionError
from drivers.pms5003 import codec
from drivers.uart import BaseProtocol, SerialDriver, SerialLink, SerialSettings, options

_log = logging.getLogger(__name__)

MODES = ("active", "passive")
#: sleep-between-reads: longest wait for the answer to a read before asking again
READ_RETRY_S = 2.0
#: a blank frame (all measurement words zero) this long after a wake counts as warm-up
BLANK_WINDOW_S = 60.0
_KNOWN = (
    "port",
    "baud",
    "mode",
    "poll_interval_s",
    "silence_timeout_s",
    "warmup_s",
    "sleep_between_reads",
)


@dataclass(frozen=True, slots=True)
class Pms5003Options:
    """Validated settings of one PMS5003 (see README.md, "Settings")."""

    port: str
    baud: int = 9600
    mode: str = "active"
    poll_interval_s: float = 2.3
    silence_timeout_s: float = 10.0
    warmup_s: float = 30.0
    sleep_between_reads: bool = False


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> Pms5003Options:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    options.reject_unknown("pms5003", sensor_id, table, _KNOWN)
    d = Pms5003Options(port="")
    result = Pms5003Options(
        port=options.port(table),
        baud=options.baud(table, d.baud),
        mode=options.choice(table, "mode", d.mode, MODES),
        poll_interval_s=options.seconds(table, "poll_interval_s", d.poll_interval_s, 0.1, 86400),
        silence_timeout_s=options.seconds(
            table, "silence_timeout_s", d.silence_timeout_s, 0.5, 86400
        ),
        warmup_s=options.seconds(table, "warmup_s", d.warmup_s, 0.0, 600),
        sleep_between_reads=options.flag(table, "sleep_between_reads", d.sleep_between_reads),
    )
    passive = result.mode == "passive"
    if passive and result.silence_timeout_s <= result.poll_interval_s:
        raise OptionError("silence_timeout_s", "must be longer than poll_interval_s")
    if result.sleep_between_reads and not passive:
        raise OptionError("sleep_between_reads", 'needs mode = "passive"')
    if result.sleep_between_reads and result.poll_interval_s <= result.warmup_s:
        raise OptionError("sleep_between_reads", "needs poll_interval_s longer than warmup_s")
    return result


class _Phase:
    """Where a sleep-between-reads cycle stands (plain strings, for logs)."""

    WARMING = "warming"
    READING = "reading"
    ASLEEP = "asleep"


class Pms5003Protocol(BaseProtocol):
    """The sensor's side of the conversation, as `SerialDriver` drives it."""

    def __init__(self, opts: Pms5003Options) -> None:
        self.opts = opts
        self.parser = codec.StreamParser()
        self.warmup_frames = 0
        self.blank_frames = 0
        self.want_awake = True
        self._link: SerialLink | None = None
        self._woke_at: float | None = None  # loop time of our last wake; None: no timed warm-up
        self._last_wake = float("-inf")  # loop time of the last wake command, on open too
        self._phase = _Phase.WARMING
        self._read_at = 0.0  # sleep-between-reads: when the current cycle's read is due

    # -- SerialDriver hooks ------------------------------------------------------------------

    def connected(self, link: SerialLink) -> None:
        self._link = link
        self.parser.reset()
        passive = self.opts.mode == "passive"
        link.write(codec.PASSIVE_MODE if passive else codec.ACTIVE_MODE)
        if not self.want_awake:
            link.write(codec.SLEEP_COMMAND)
            return
        # the sensor may have been left asleep (by us, before a restart): wake it; a sensor
        # that is awake ignores this, so only all-zero frames count as warm-up here
        link.write(codec.WAKE_COMMAND)
        self._last_wake = link.time()
        self._woke_at = link.time() if self.opts.sleep_between_reads else None
        self._phase = _Phase.WARMING
        self._read_at = link.time() + (self.opts.warmup_s if self.opts.sleep_between_reads else 0)

    def disconnected(self) -> None:
        self._link = None

    def poll(self, link: SerialLink) -> float | None:
        if self.opts.mode != "passive" or not self.want_awake:
            return None
        if not self.opts.sleep_between_reads:
            link.write(codec.PASSIVE_READ)
            return None
        return self._cycle(link)

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        out: list[Decoded] = []
        for frame in self.parser.feed_frames(data):
            note = self._discard(frame, now)
            if note:
                out.append(Decoded([], note=note))
                continue
            out.append(Decoded(codec.decode_frame(frame)))
            if self.opts.sleep_between_reads and self._phase == _Phase.READING:
                self._after_read(now)
        return out

    def counters(self) -> Mapping[str, int]:
        p = self.parser
        return {
            "frames": p.frames,
            "bad_frames": p.bad_frames,
            "bad_bytes": p.bad_bytes,
            "acks": p.acks,
            "warmup_frames": self.warmup_frames,
            "blank_frames": self.blank_frames,
        }

    # -- sleep and wake --------------------------------------------------------------------

    def sleep(self) -> None:
        self.want_awake = False
        self._woke_at = None
        if self._link is not None:
            self._link.write(codec.SLEEP_COMMAND)

    def wake(self) -> None:
        self.want_awake = True
        if self._link is None:
            return  # `connected` wakes it
        self._link.write(codec.WAKE_COMMAND)
        self._start_warmup(self._link.time())
        self._read_at = self._link.time() + self.opts.warmup_s
        self._phase = _Phase.WARMING
        if self.opts.mode == "passive":
            self._link.poll_in(self.opts.warmup_s if self.opts.sleep_between_reads else 0.0)

    def _start_warmup(self, now: float) -> None:
        self._woke_at = now
        self._last_wake = now

    def _discard(self, frame: bytes, now: float) -> str:
        """Why a valid frame is not a measurement ("" if it is one); counts it."""
        if self._woke_at is not None and now - self._woke_at < self.opts.warmup_s:
            self.warmup_frames += 1
            return "warming up"
        if not codec.is_blank(frame):
            return ""
        if now - self._last_wake < max(self.opts.warmup_s, BLANK_WINDOW_S):
            self.warmup_frames += 1  # the fan is still spinning up
            return "warming up"
        self.blank_frames += 1  # zero particle counts: the sensor is not measuring
        return "blank frame"

    # -- sleep between passive reads ---------------------------------------------------------

    def _cycle(self, link: SerialLink) -> float:
        """One step of wake -> warm up -> read -> sleep; returns when to look again."""
        now = link.time()
        if self._phase == _Phase.ASLEEP:
            link.write(codec.WAKE_COMMAND)
            self._start_warmup(now)
            self._phase = _Phase.WARMING
            return max(self._read_at - now, self.opts.warmup_s)
        if self._phase == _Phase.WARMING and now < self._read_at:
            return self._read_at - now
        self._phase = _Phase.READING
        link.write(codec.PASSIVE_READ)
        # asked again unless the answer arrives first
        return min(READ_RETRY_S, self.opts.poll_interval_s / 4)

    def _after_read(self, now: float) -> None:
        link = self._link
        if link is None:
            return
        link.write(codec.SLEEP_COMMAND)
        self._phase = _Phase.ASLEEP
        self._woke_at = None
        self._read_at = max(self._read_at + self.opts.poll_interval_s, now + self.opts.warmup_s)
        link.poll_in(self._read_at - self.opts.warmup_s - now)


class Pms5003Driver:
    """One PMS5003 on one serial port; `run` returns only when cancelled."""

    def __init__(self, sensor_id: str, opts: Pms5003Options) -> None:
        self.sensor_id = sensor_id
        self._protocol = Pms5003Protocol(opts)
        settings = SerialSettings(
            port=opts.port,
            baud=opts.baud,
            silence_timeout_s=opts.silence_timeout_s,
            poll_interval_s=opts.poll_interval_s if opts.mode == "passive" else None,
        )
        self._serial = SerialDriver(sensor_id, settings, self._protocol)

    def state(self) -> DriverState:
        state = self._serial.state()
        port_fine = state.reason == "ok" or state.reason.startswith("silent")
        if self._protocol.want_awake or not port_fine:
            return state
        return DriverState(False, "asleep (on request)", state.counters)

    async def run(self, emit: Emit) -> None:
        await self._serial.run(emit)

    def sleep(self) -> None:
        """Put the sensor to sleep (fan off) now and after every reopen, until `wake`."""
        _log.info("%s: sleep requested", self.sensor_id)
        self._protocol.sleep()

    def wake(self) -> None:
        """Wake the sensor; readings within `warmup_s` from now are dropped and counted."""
        _log.info("%s: wake requested", self.sensor_id)
        self._protocol.wake()


class Pms5003Family:
    """The registry's view of the family: option parsing, construction, one-frame decoding."""

    name = "pms5003"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> Pms5003Options:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, Pms5003Options):
            raise TypeError(f"expected Pms5003Options, got {type(options).__name__}")
        return Pms5003Driver(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        return Decoded(codec.decode_frame(data))
