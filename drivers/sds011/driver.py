"""Bind the SDS011 codec to a serial port and a schedule under asyncio.

The port (pyserial, reader callback, reopen with backoff, silence) belongs to
`drivers.uart.SerialDriver`; this module is the sensor's side of the
conversation on top of it. The SDS011 keeps its reporting mode and working
period across power cycles, so on every open the driver asks whether the
sensor sleeps, wakes it if so, and sets the mode and period it wants. Each
command waits for its reply, matched by type (C5 + sub-command, or any
measurement for a query), never by position: in active mode measurements
keep streaming between the command and its reply. Lost replies are retried.

In query mode the driver asks for a measurement every `poll_interval_s`;
with `sleep_between_polls` it wakes the sensor `warmup_s` before each query
and puts it back to sleep after the answer, which spares the laser and fan.
Measurements within `warmup_s` of a wake, and all-zero measurements, are
warm-up: dropped and counted, never emitted.

Trust: the config table is unverified until `parse_options` accepts it; the
bytes from the port are unverified until the codec accepts a frame.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import Decoded, Driver, OptionError
from drivers.sds011 import codec
from drivers.uart import BaseProtocol, SerialDriver, SerialLink, SerialSettings, options

_log = logging.getLogger(__name__)

MODES = ("active", "query")
REPLY_TIMEOUT_S = 0.5  # command and reply take ~30 ms of wire time at 9600 baud
TRIES = 3
#: sleep_between_polls: the poll interval must leave this much beyond the warm-up
CYCLE_MARGIN_S = 1.0
_KNOWN = (
    "port",
    "baud",
    "mode",
    "poll_interval_s",
    "working_period_min",
    "sleep_between_polls",
    "warmup_s",
    "silence_timeout_s",
)


@dataclass(frozen=True, slots=True)
class Sds011Options:
    """Validated settings of one SDS011 (see README.md, "Settings")."""

    port: str
    baud: int = 9600
    mode: str = "active"
    poll_interval_s: float = 1.0
    working_period_min: int = 0
    sleep_between_polls: bool = False
    warmup_s: float = 30.0
    silence_timeout_s: float = 10.0


def _minutes(table: Mapping[str, Any]) -> int:
    value = table.get("working_period_min", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError("working_period_min", f"must be an integer, got {value!r}")
    if not 0 <= value <= codec.MAX_PERIOD_MIN:
        raise OptionError(
            "working_period_min", f"must be 0 (continuous) to {codec.MAX_PERIOD_MIN}, got {value}"
        )
    return value


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> Sds011Options:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    options.reject_unknown("sds011", sensor_id, table, _KNOWN)
    d = Sds011Options(port="")
    result = Sds011Options(
        port=options.port(table),
        baud=options.baud(table, d.baud),
        mode=options.choice(table, "mode", d.mode, MODES),
        poll_interval_s=options.seconds(table, "poll_interval_s", d.poll_interval_s, 0.1, 86400),
        working_period_min=_minutes(table),
        sleep_between_polls=options.flag(table, "sleep_between_polls", d.sleep_between_polls),
        warmup_s=options.seconds(table, "warmup_s", d.warmup_s, 0.0, 600),
        silence_timeout_s=options.seconds(
            table, "silence_timeout_s", d.silence_timeout_s, 0.5, 86400
        ),
    )
    query = result.mode == "query"
    if query and result.working_period_min:
        raise OptionError("working_period_min", 'needs mode = "active" (or 0)')
    if result.sleep_between_polls and not query:
        raise OptionError("sleep_between_polls", 'needs mode = "query"')
    if result.sleep_between_polls and result.poll_interval_s < result.warmup_s + CYCLE_MARGIN_S:
        raise OptionError(
            "sleep_between_polls",
            f"needs poll_interval_s of at least warmup_s + {CYCLE_MARGIN_S:g} s",
        )
    if query and result.silence_timeout_s <= result.poll_interval_s:
        raise OptionError("silence_timeout_s", "must be longer than poll_interval_s")
    period_s = 60 * result.working_period_min
    if result.silence_timeout_s <= period_s:
        raise OptionError(
            "silence_timeout_s", f"must be longer than the working period ({period_s} s)"
        )
    return result


def next_due(due: float, interval: float, now: float) -> float:
    """The time after `due` on a fixed cadence; a cadence fallen behind restarts from `now`."""
    following = due + interval
    return following if following > now else now + interval


@dataclass(slots=True)
class _Request:
    """One command waiting for its reply."""

    sub: int
    frame: bytes
    on_reply: Callable[[bytes], None]
    tries_left: int = TRIES
    deadline: float = 0.0
    silence_expected: bool = False  # no reply is an answer too (not counted as lost)


class Sds011Protocol(BaseProtocol):
    """The host's side of the SDS011 conversation, as `SerialDriver` drives it."""

    def __init__(self, opts: Sds011Options) -> None:
        self.opts = opts
        self.parser = codec.StreamParser()
        self.warmup_frames = 0
        self.unmatched_replies = 0
        self.lost_replies = 0
        self.firmware = ""
        self._link: SerialLink | None = None
        self._queue: deque[_Request] = deque()
        self._inflight: _Request | None = None
        self._configured = False
        self._warm_at = 0.0  # loop time before which measurements are warm-up
        self._next_query = 0.0  # query mode: when the next query is due
        self._asleep = False  # sleep_between_polls: we put the sensor to sleep
        self._unanswered = False  # a command went unanswered (logged once until a reply)

    # -- SerialDriver hooks ------------------------------------------------------------------

    def connected(self, link: SerialLink) -> None:
        self._link = link
        self.parser.reset()
        self._queue.clear()
        self._inflight = None
        self._configured = False
        self._asleep = False
        self._warm_at = link.time()
        # the sensor remembers its settings and may have been left asleep: look first (once:
        # a sleeping sensor never answers, and no answer means "wake it")
        state = codec.get_setting(codec.SUB_SLEEP)
        request = _Request(codec.SUB_SLEEP, state, self._on_work_state, tries_left=1)
        request.silence_expected = True
        self._queue.append(request)
        self._kick(link)

    def disconnected(self) -> None:
        self._link = None
        self._inflight = None
        self._queue.clear()

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        out: list[Decoded] = []
        for cmd, payload in self.parser.feed(data):
            request = self._inflight
            answered = request is not None and codec.answers(request.sub, cmd, payload)
            if request is not None and answered:
                self._inflight = None
                self._unanswered = False
                request.on_reply(payload)
            if cmd == codec.CMD_REPLY:
                if not answered:
                    self.unmatched_replies += 1
                out.append(Decoded([], note=codec.describe_reply(payload)))
            else:
                out.append(self._measurement(payload, now))
        if self._link is not None and self._inflight is None:
            self._kick(self._link)
        return out

    def poll(self, link: SerialLink) -> float | None:
        now = link.time()
        request = self._inflight
        if request is not None and now >= request.deadline:
            self._inflight = None
            if request.tries_left > 0:
                self._queue.appendleft(request)
            elif request.silence_expected:
                request.on_reply(b"")
            else:
                self.lost_replies += 1
                if not self._unanswered:  # one line per event, not per lost reply
                    name = codec.SUB_NAMES.get(request.sub, str(request.sub))
                    _log.warning("%s: no reply to %s", link.port, name)
                self._unanswered = True
                request.on_reply(b"")  # go on as if it had worked; retried after a reopen
        return self._step(link)

    def counters(self) -> Mapping[str, int]:
        p = self.parser
        return {
            "frames": p.frames,
            "replies": p.replies,
            "bad_frames": p.bad_frames,
            "bad_bytes": p.bad_bytes,
            "warmup_frames": self.warmup_frames,
            "unmatched_replies": self.unmatched_replies,
            "lost_replies": self.lost_replies,
        }

    # -- requests ------------------------------------------------------------------------

    def _ask(self, sub: int, frame: bytes, on_reply: Callable[[bytes], None]) -> None:
        self._queue.append(_Request(sub, frame, on_reply))

    def _kick(self, link: SerialLink) -> None:
        """Act now and plan the next wake-up of `poll`."""
        delay = self._step(link)
        if delay is not None:
            link.poll_in(delay)

    def _step(self, link: SerialLink) -> float | None:
        """Send what is due; return seconds until `poll` must look again (None: never)."""
        now = link.time()
        if self._inflight is None and self._queue:
            request = self._queue.popleft()
            request.tries_left -= 1
            request.deadline = now + REPLY_TIMEOUT_S
            self._inflight = request
            link.write(request.frame)
        if self._inflight is not None:
            return max(self._inflight.deadline - now, 0.0)
        if not self._configured or self.opts.mode != "query":
            return None
        return self._query_step(link, now)

    def _query_step(self, link: SerialLink, now: float) -> float:
        opts = self.opts
        if opts.sleep_between_polls and self._asleep:
            wake_at = self._next_query - opts.warmup_s
            if now < wake_at:
                return wake_at - now
            self._asleep = False
            self._ask(codec.SUB_SLEEP, codec.set_working(work=True), self._on_woken)
            return self._step(link) or 0.0
        if now < self._next_query:
            return self._next_query - now
        self._next_query = next_due(self._next_query, opts.poll_interval_s, now)
        self._ask(codec.SUB_QUERY, codec.query_data(), self._on_answer)
        return self._step(link) or 0.0

    # -- replies ----------------------------------------------------------------------------

    def _on_work_state(self, payload: bytes) -> None:
        working = bool(payload) and codec.reply_fields(payload)[2] == codec.WORK
        if not working:  # asleep, or no reply (a sleeping sensor ignores the question)
            self._ask(codec.SUB_SLEEP, codec.set_working(work=True), self._on_woken)
        query = self.opts.mode == "query"
        self._ask(codec.SUB_MODE, codec.set_mode(query=query), self._on_setting)
        if not query:
            period = codec.set_period(self.opts.working_period_min)
            self._ask(codec.SUB_PERIOD, period, self._on_setting)
        self._ask(codec.SUB_FIRMWARE, codec.get_setting(codec.SUB_FIRMWARE), self._on_firmware)

    def _on_woken(self, _payload: bytes) -> None:
        if self._link is not None:
            self._warm_at = self._link.time() + self.opts.warmup_s
            self._next_query = max(self._next_query, self._warm_at)

    def _on_setting(self, payload: bytes) -> None:
        if payload:
            _log.info("%s: %s", self._port(), codec.describe_reply(payload)[len("reply: ") :])

    def _on_firmware(self, payload: bytes) -> None:
        if payload:
            _sub, year, month, day, device = codec.reply_fields(payload)
            self.firmware = f"20{year:02d}-{month:02d}-{day:02d}"
            _log.info("%s: SDS011 %04x, firmware %s", self._port(), device, self.firmware)
        self._configured = True

    def _on_answer(self, _payload: bytes) -> None:
        link = self._link
        if link is None or not self.opts.sleep_between_polls:
            return
        self._asleep = True
        self._ask(codec.SUB_SLEEP, codec.set_working(work=False), lambda _p: None)

    def _port(self) -> str:
        return self._link.port if self._link is not None else "?"

    def _measurement(self, payload: bytes, now: float) -> Decoded:
        if codec.is_warmup(payload) or now < self._warm_at:
            self.warmup_frames += 1
            return Decoded([], note="warming up")
        pm2_5, pm10, _device = codec.measurement(payload)
        return Decoded([("pm2_5", "ug/m3", pm2_5), ("pm10", "ug/m3", pm10)])

    # -- shutdown ------------------------------------------------------------------------

    async def park(self, link: SerialLink) -> None:
        """On stop: a sensor we put to sleep between polls is left asleep."""
        if self.opts.sleep_between_polls:
            link.write(codec.set_working(work=False))


class Sds011Driver(SerialDriver):
    """One SDS011 on one serial port; on stop the core awaits `Sds011Protocol.park`."""

    protocol: Sds011Protocol

    def __init__(self, sensor_id: str, opts: Sds011Options) -> None:
        settings = SerialSettings(
            port=opts.port, baud=opts.baud, silence_timeout_s=opts.silence_timeout_s
        )
        super().__init__(sensor_id, settings, Sds011Protocol(opts))


class Sds011Family:
    """The registry's view of the family: option parsing, construction, one-frame decoding."""

    name = "sds011"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> Sds011Options:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, Sds011Options):
            raise TypeError(f"expected Sds011Options, got {type(options).__name__}")
        return Sds011Driver(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        records = codec.decode(data)
        if records:
            return Decoded(records)
        if len(data) == codec.COMMAND_LEN:
            return Decoded([], note=codec.describe_command(data))
        return Decoded([], note=codec.describe_frame(data))
