"""Bind the SPS30 SHDLC codec to a serial port and a schedule under asyncio.

The port (pyserial, reader callback, reopen with backoff, silence) belongs to
`drivers.uart.SerialDriver`; this module is the host's side of the SHDLC
conversation. The SPS30 never talks unasked, so on every open the driver
wakes it (a 0xFF pulse, then the wake-up command), stops any measurement a
previous run left going, starts one in the configured output format, reads
the serial number once, and then asks for the measured values every
`poll_interval_s`. Each command waits for the reply carrying its command
byte; a lost reply is retried, and a measurement that stops answering (a
power cycle, a reset) is started again. Every refusal is reported with the
meaning of its state byte. When the driver stops it stops the measurement
and, with `sleep_on_stop`, puts the sensor to sleep.

Trust: the config table is unverified until `parse_options` accepts it; the
bytes from the port are unverified until the codec accepts a frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import Decoded, Driver, OptionError
from drivers.sps30 import codec
from drivers.uart import BaseProtocol, SerialDriver, SerialLink, SerialSettings, options

_log = logging.getLogger(__name__)

OUTPUTS = {"float": codec.FORMAT_FLOAT, "uint16": codec.FORMAT_UINT16}
REPLY_TIMEOUT_S = 0.5  # a reply is a few ms of wire time at 115200 baud
TRIES = 3
RESTART_S = 5.0  # after a refused start, try the start-up again this much later
NO_REPLY = -1  # the state passed to a reply handler when the sensor did not answer
_KNOWN = ("port", "baud", "output", "poll_interval_s", "silence_timeout_s", "sleep_on_stop")


@dataclass(frozen=True, slots=True)
class Sps30Options:
    """Validated settings of one SPS30 (see README.md, "Settings")."""

    port: str
    baud: int = 115200
    output: str = "float"
    poll_interval_s: float = 1.0
    silence_timeout_s: float = 10.0
    sleep_on_stop: bool = True


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> Sps30Options:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    options.reject_unknown("sps30", sensor_id, table, _KNOWN)
    d = Sps30Options(port="")
    result = Sps30Options(
        port=options.port(table),
        baud=options.baud(table, d.baud),
        output=options.choice(table, "output", d.output, tuple(OUTPUTS)),
        poll_interval_s=options.seconds(table, "poll_interval_s", d.poll_interval_s, 0.2, 86400),
        silence_timeout_s=options.seconds(
            table, "silence_timeout_s", d.silence_timeout_s, 0.5, 86400
        ),
        sleep_on_stop=options.flag(table, "sleep_on_stop", d.sleep_on_stop),
    )
    if result.silence_timeout_s <= result.poll_interval_s:
        raise OptionError("silence_timeout_s", "must be longer than poll_interval_s")
    return result


Handler = Callable[[int, bytes], None]


def next_due(due: float, interval: float, now: float) -> float:
    """The time after `due` on a fixed cadence; a cadence fallen behind restarts from `now`."""
    following = due + interval
    return following if following > now else now + interval


@dataclass(slots=True)
class _Request:
    """One command waiting for the reply with the same command byte."""

    cmd: int
    frame: bytes
    on_reply: Handler
    tries_left: int = TRIES
    deadline: float = 0.0
    optional: bool = False  # sent once; no reply is no fault (e.g. waking a sensor awake)


class Sps30Protocol(BaseProtocol):
    """The host's side of the SHDLC conversation, as `SerialDriver` drives it."""

    def __init__(self, opts: Sps30Options) -> None:
        self.opts = opts
        self.parser = codec.StreamParser(miso=True)
        self.serial_number = ""
        self.measuring = False
        self.empty_reads = 0
        self.state_errors = 0
        self.device_errors = 0
        self.lost_replies = 0
        self.unmatched_replies = 0
        self._link: SerialLink | None = None
        self._queue: deque[_Request] = deque()
        self._inflight: _Request | None = None
        self._next_read = 0.0
        self._restart_at: float | None = None
        self._flagged = False  # the device error flag was set in the last reply
        self._last_refusal = ""  # logged once until the next success
        self._parked: Callable[[], None] | None = None
        self._unanswered = False  # a command went unanswered (logged once until a reply)

    # -- SerialDriver hooks ------------------------------------------------------------------

    def connected(self, link: SerialLink) -> None:
        self._link = link
        self.parser.reset()
        self._startup()
        self._kick(link)

    def disconnected(self) -> None:
        self._link = None
        self._inflight = None
        self._queue.clear()
        self.measuring = False

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        out: list[Decoded] = []
        for address, cmd, state, payload in self.parser.feed(data):
            request = self._inflight
            if address != codec.ADDRESS or request is None or request.cmd != cmd:
                self.unmatched_replies += 1
                out.append(Decoded([], note=f"unexpected reply to 0x{cmd:02x}"))
                continue
            self._inflight = None
            self._unanswered = False
            self._note_state(cmd, state)
            out.append(self._reading(cmd, state, payload))
            request.on_reply(state, payload)
        if self._link is not None and self._inflight is None:
            self._kick(self._link)
        return out

    def poll(self, link: SerialLink) -> float | None:
        request = self._inflight
        if request is not None and link.time() >= request.deadline:
            self._inflight = None
            if request.tries_left > 0:
                self._queue.appendleft(request)
            else:
                self._lost(link, request)
                request.on_reply(NO_REPLY, b"")
        return self._step(link)

    def counters(self) -> Mapping[str, int]:
        p = self.parser
        return {
            "frames": p.frames,
            "bad_frames": p.bad_frames,
            "bad_bytes": p.bad_bytes,
            "empty_reads": self.empty_reads,
            "state_errors": self.state_errors,
            "device_errors": self.device_errors,
            "lost_replies": self.lost_replies,
            "unmatched_replies": self.unmatched_replies,
        }

    # -- scheduling ----------------------------------------------------------------------------

    def _ask(self, cmd: int, data: bytes, on_reply: Handler, optional: bool = False) -> None:
        frame = codec.mosi_frame(cmd, data)
        if cmd == codec.CMD_WAKE:
            frame = codec.WAKE_PULSE + frame  # a sleeping sensor's UART needs an edge first
        tries = 1 if optional else TRIES
        self._queue.append(_Request(cmd, frame, on_reply, tries, optional=optional))

    def _lost(self, link: SerialLink, request: _Request) -> None:
        if request.optional:
            return
        self.lost_replies += 1
        if not self._unanswered:  # one line per event, not per lost reply
            name = codec.COMMAND_NAMES.get(request.cmd, "?")
            _log.warning("%s: no reply to 0x%02x (%s)", link.port, request.cmd, name)
            self._unanswered = True

    def _kick(self, link: SerialLink) -> None:
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
        if self._parked is not None:
            return None
        if self._restart_at is not None:
            if now < self._restart_at:
                return self._restart_at - now
            self._startup()
            return self._step(link)
        return self._read_step(link, now) if self.measuring else None

    def _read_step(self, link: SerialLink, now: float) -> float | None:
        if now < self._next_read:
            return self._next_read - now
        self._next_read = next_due(self._next_read, self.opts.poll_interval_s, now)
        self._ask(codec.CMD_READ, b"", self._on_read)
        return self._step(link)

    def _startup(self) -> None:
        """Wake, stop whatever runs, start in our format (and learn the serial number)."""
        self._restart_at = None
        self.measuring = False
        self._queue.clear()
        self._ask(codec.CMD_WAKE, b"", _ignore, optional=True)
        self._ask(codec.CMD_STOP, b"", _ignore, optional=True)
        output = bytes([0x01, OUTPUTS[self.opts.output]])
        self._ask(codec.CMD_START, output, self._on_started)
        if not self.serial_number:
            self._ask(codec.CMD_INFO, bytes([codec.INFO_SERIAL]), self._on_serial, optional=True)

    # -- replies -----------------------------------------------------------------------------

    def _note_state(self, cmd: int, state: int) -> None:
        if state & 0x7F and cmd in (codec.CMD_WAKE, codec.CMD_STOP):
            pass  # nothing asleep to wake, nothing running to stop: expected, not a fault
        elif state & 0x7F:
            self.state_errors += 1
            name = codec.COMMAND_NAMES.get(cmd, "?")
            text = f"0x{cmd:02x} ({name}) refused: {codec.state_text(state)}"
            if text != self._last_refusal:
                _log.warning("%s: %s", self._port(), text)
                self._last_refusal = text
        else:
            self._last_refusal = ""
        flagged = bool(state & codec.STATE_ERROR_FLAG)
        if flagged and not self._flagged:
            self.device_errors += 1
            self._ask(codec.CMD_STATUS, b"\x00", self._on_status, optional=True)
        elif self._flagged and not flagged:
            _log.info("%s: device error flag cleared", self._port())
        self._flagged = flagged

    def _reading(self, cmd: int, state: int, payload: bytes) -> Decoded:
        if cmd != codec.CMD_READ or state & 0x7F:
            return Decoded([], note=f"reply to 0x{cmd:02x}, state 0x{state:02x}")
        if not payload:
            self.empty_reads += 1
            return Decoded([], note="no new measured values yet")
        return Decoded(codec.measured_values(payload))

    def _on_started(self, state: int, _payload: bytes) -> None:
        if state == NO_REPLY or state & 0x7F:
            self._restart_at = (self._link.time() if self._link else 0.0) + RESTART_S
            return
        self.measuring = True
        self._next_read = self._link.time() if self._link else 0.0
        _log.info("%s: measuring, %s output", self._port(), self.opts.output)

    def _on_read(self, state: int, _payload: bytes) -> None:
        if state == NO_REPLY or state & 0x7F:
            # reset, power-cycled or asleep: the measurement is gone; start it again
            self._startup()

    def _on_serial(self, state: int, payload: bytes) -> None:
        if state != NO_REPLY and not state & 0x7F:
            self.serial_number = codec.info_text(payload)
            _log.info("%s: SPS30 serial number %s", self._port(), self.serial_number)

    def _on_status(self, state: int, payload: bytes) -> None:
        text = "unknown (no status reply)"
        if state != NO_REPLY and not state & 0x7F and len(payload) >= 4:
            text = codec.status_text(codec.status_register(payload))
        _log.warning("%s: device error flag set; status register: %s", self._port(), text)

    def _port(self) -> str:
        return self._link.port if self._link is not None else "?"

    # -- shutdown ------------------------------------------------------------------------

    async def park(self, link: SerialLink) -> None:
        """Stop the measurement (and sleep); return once the sensor has answered."""
        parked = asyncio.Event()
        self._parked = parked.set
        self._queue.clear()
        self._inflight = None
        self._ask(codec.CMD_STOP, b"", self._on_stopped, optional=True)
        self._kick(link)
        await parked.wait()

    def _on_stopped(self, _state: int, _payload: bytes) -> None:
        self.measuring = False
        if self.opts.sleep_on_stop:
            self._ask(codec.CMD_SLEEP, b"", self._on_asleep, optional=True)
        else:
            self._on_asleep(0, b"")

    def _on_asleep(self, _state: int, _payload: bytes) -> None:
        if self._parked is not None:
            self._parked()


def _ignore(_state: int, _payload: bytes) -> None:
    return None


class Sps30Driver(SerialDriver):
    """One SPS30 on one serial port; on stop the core awaits `Sps30Protocol.park`."""

    protocol: Sps30Protocol

    def __init__(self, sensor_id: str, opts: Sps30Options) -> None:
        settings = SerialSettings(
            port=opts.port, baud=opts.baud, silence_timeout_s=opts.silence_timeout_s
        )
        super().__init__(sensor_id, settings, Sps30Protocol(opts))


class Sps30Family:
    """The registry's view of the family: option parsing, construction, one-frame decoding."""

    name = "sps30"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> Sps30Options:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, Sps30Options):
            raise TypeError(f"expected Sps30Options, got {type(options).__name__}")
        return Sps30Driver(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        return Decoded(codec.decode(data), note=codec.describe(data))
