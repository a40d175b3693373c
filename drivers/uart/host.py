"""The host side of a serial sensor: one owner per port, bytes in, decoded frames out.

`SerialDriver` owns one serial port for one sensor. It opens the port with
pyserial (8N1, no flow control, exclusive), watches the file descriptor with
`loop.add_reader` (no thread, no busy loop), hands every chunk of received
bytes to the family's `LineProtocol`, and emits the readings of the frames
the protocol returns. Timers (not a polling loop) call the protocol's `poll`
hook and notice silence. A port that hangs up or fails is closed and reopened
with exponential backoff.

Trust: the bytes from the port are unverified; only the family's protocol
(through its codec) turns them into frames. The settings are trusted: the
family validated them. A 0-byte read is NOT trusted to mean a hang-up: with
pyserial's non-blocking, VMIN=0 configuration an idle tty also reads 0 bytes,
so the driver asks `poll()` for POLLHUP/POLLERR before giving up the port
(a needless reopen loses data, because pyserial's open() flushes the input).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import serial

from drivers.base import Decoded, DriverState, Emit, Reading

_log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.5
#: on stop, how long a family may take to leave its device stopped or asleep
PARK_TIMEOUT_S = 1.0
BACKOFF_MAX_S = 30.0
#: after a readiness report that delivered nothing, the fd is not watched for this long
SPURIOUS_PAUSE_S = 0.02
#: what a port delivered when bytes came but no frame: the end of a "no valid frame" reason
GARBAGE = "garbage (noise, or a wrong baud rate)"
_READ_CHUNK = 512


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """How to run one port: where, how fast, when to call it silent, how often to poll."""

    port: str
    baud: int = 9600
    silence_timeout_s: float = 10.0
    #: None: never call `LineProtocol.poll` (the sensor talks by itself)
    poll_interval_s: float | None = None


class LinkLost(Exception):
    """The port hung up or failed; the message is the reason shown in state()."""


def next_backoff(delay: float) -> float:
    """The wait after `delay`: doubled, capped at BACKOFF_MAX_S."""
    return min(delay * 2, BACKOFF_MAX_S)


def hung_up(fd: int) -> bool:
    """True if the kernel reports a hang-up or error condition on `fd` right now."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))


class SerialLink:
    """The open port as the family's protocol sees it: write commands, read the clock,
    ask for an earlier poll. Valid from `connected` until `disconnected`."""

    def __init__(self, port: str, fd: int, session: _Session) -> None:
        self.port = port
        self._fd = fd
        self._session = session

    @property
    def is_open(self) -> bool:
        return not self._session.lost.done()

    def time(self) -> float:
        """The event loop's monotonic clock, in seconds."""
        return self._session.loop.time()

    def write(self, data: bytes) -> bool:
        """Send bytes to the sensor. A UART drains on its own, so a short write means the
        port is stuck: the link is then dropped (and reopened) and False returned."""
        if not self.is_open:
            return False
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._session.fail(LinkLost(f"write failed: {exc}"))
            return False
        if sent != len(data):
            self._session.fail(LinkLost(f"output stalled ({sent} of {len(data)} bytes written)"))
            return False
        return True

    def poll_in(self, delay_s: float) -> None:
        """Call the protocol's `poll` hook in `delay_s` seconds instead of when planned."""
        self._session.schedule_poll(delay_s)


class LineProtocol(Protocol):
    """What a family plugs into `SerialDriver`; subclass `BaseProtocol` for the defaults.

    Every hook runs on the event loop thread. An exception raised by a hook is a
    bug, not a line fault: it ends `SerialDriver.run`.
    """

    def connected(self, link: SerialLink) -> None:
        """The port was (re)opened: forget partial input, send start-up commands."""

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        """Bytes from the port (any split); return the complete frames they finished.

        A Decoded with records is emitted as one batch of readings; one with no
        records (warm-up, no echo, an ack the family cares about) still proves
        the sensor alive. `now` is the loop clock."""
        ...

    def poll(self, link: SerialLink) -> float | None:
        """Called every poll interval (only if `poll_interval_s` is set), first right after
        `connected`. Return the seconds until the next call, or None for the interval."""
        ...

    def disconnected(self) -> None:
        """The port is gone; the link must not be used any more."""

    def counters(self) -> Mapping[str, int]:
        """The family's counters for `state()` (frames, bad bytes, ...)."""
        ...

    async def park(self, link: SerialLink) -> None:
        """The driver is stopping and the port still open: leave the device in a safe
        state (stop measuring, sleep). Replies are still read while it runs; it is
        given at most PARK_TIMEOUT_S."""


class BaseProtocol:
    """No-op defaults for the optional hooks of `LineProtocol`."""

    def connected(self, link: SerialLink) -> None:
        return None

    def poll(self, link: SerialLink) -> float | None:
        return None

    def disconnected(self) -> None:
        return None

    def counters(self) -> Mapping[str, int]:
        return {}

    async def park(self, link: SerialLink) -> None:
        return None


class _Session:
    """One open port: reader callback, poll and silence timers, the `lost` future."""

    def __init__(self, driver: SerialDriver, port: serial.Serial, emit: Emit) -> None:
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.frames = 0
        self._driver = driver
        self._fd = port.fileno()
        self._emit = emit
        self._poll_timer: asyncio.TimerHandle | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._resume_timer: asyncio.TimerHandle | None = None
        self._last_frame = self.loop.time()
        self._unframed = 0  # bytes received since the last frame or silence check
        self.link = SerialLink(driver.settings.port, self._fd, self)

    def fail(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)

    async def serve(self) -> None:
        """Run until the port fails (raises its reason) or the task is cancelled."""
        proto = self._driver.protocol
        self.loop.add_reader(self._fd, self._on_readable)
        try:
            self._guarded(proto.connected, self.link)
            if self._driver.settings.poll_interval_s is not None:
                self.schedule_poll(0.0)
            self._arm_silence(self._driver.settings.silence_timeout_s)
            try:
                # shielded: cancelling the driver must not close the link before `park`
                await asyncio.shield(self.lost)
            except asyncio.CancelledError:
                await self._park(proto)
                raise
        finally:
            self.loop.remove_reader(self._fd)
            for timer in (self._poll_timer, self._silence_timer, self._resume_timer):
                if timer is not None:
                    timer.cancel()
            if not self.lost.done():
                self.lost.cancel()
            elif not self.lost.cancelled():
                self.lost.exception()  # retrieved, also when cancellation won the race
            proto.disconnected()

    async def _park(self, proto: LineProtocol) -> None:
        """Give the family a bounded last word while the port is still open and read."""
        if self.lost.done():
            return
        try:
            async with asyncio.timeout(PARK_TIMEOUT_S):
                await proto.park(self.link)
        except TimeoutError:
            _log.info("%s: device did not confirm stopping", self._driver.sensor_id)
        except (OSError, serial.SerialException) as exc:
            _log.info("%s: could not stop the device: %s", self._driver.sensor_id, exc)

    def _guarded(self, hook: Callable[..., object], *args: object) -> object:
        """Call a family hook; a bug in it ends the session with that exception."""
        try:
            return hook(*args)
        except Exception as exc:
            self.fail(exc)
            return None

    # -- input ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.lost.done():
            return
        try:
            data = os.read(self._fd, _READ_CHUNK)
        except BlockingIOError:
            data = b""
        except OSError as exc:
            reason = "hung up" if exc.errno == errno.EIO else f"read failed: {exc}"
            self.fail(LinkLost(reason))
            return
        if data:
            self._deliver(data)
        elif hung_up(self._fd):
            self.fail(LinkLost("hung up (end of file)"))
        else:
            self._spurious()

    def _spurious(self) -> None:
        """Readable but nothing there and no hang-up: stop watching for a moment, so that
        a descriptor that keeps reporting readiness cannot make the loop spin."""
        self._driver.spurious_wakes += 1
        self.loop.remove_reader(self._fd)
        if self._resume_timer is None:
            self._resume_timer = self.loop.call_later(SPURIOUS_PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._resume_timer = None
        if not self.lost.done():
            self.loop.add_reader(self._fd, self._on_readable)

    def _deliver(self, data: bytes) -> None:
        now = self.loop.time()
        try:
            frames = self._driver.protocol.data_received(data, now)
            self._unframed = 0 if frames else self._unframed + len(data)
            if frames:
                self.frames += len(frames)
                self._last_frame = now
                self._driver.mark_alive()
                for frame in frames:
                    if frame.records:
                        self._emit_records(frame)
        except Exception as exc:  # a failing emit or codec bug ends run(), never vanishes
            self.fail(exc)

    def _emit_records(self, frame: Decoded) -> None:
        stamp = time.time()
        sensor = self._driver.sensor_id
        self._emit([Reading(sensor, q, value, unit, stamp) for q, unit, value in frame.records])

    # -- timers -------------------------------------------------------------------------

    def schedule_poll(self, delay_s: float) -> None:
        if self.lost.done():
            return
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        self._poll_timer = self.loop.call_later(max(delay_s, 0.0), self._on_poll)

    def _on_poll(self) -> None:
        self._poll_timer = None
        interval = self._driver.settings.poll_interval_s
        result = self._guarded(self._driver.protocol.poll, self.link)
        if self._poll_timer is None:  # the hook did not reschedule itself through the link
            delay = result if isinstance(result, int | float) else interval
            if delay is not None:
                self.schedule_poll(delay)

    def _arm_silence(self, delay_s: float) -> None:
        self._silence_timer = self.loop.call_later(delay_s, self._on_silence_timer)

    def _on_silence_timer(self) -> None:
        timeout = self._driver.settings.silence_timeout_s
        quiet_for = self.loop.time() - self._last_frame
        if quiet_for >= timeout:
            self._driver.mark_silent(timeout, garbage=self._unframed > 0)
            self._unframed = 0
            self._arm_silence(timeout)  # look again later; the next frame clears it
        else:
            self._arm_silence(timeout - quiet_for)


class SerialDriver:
    """One sensor on one serial port; `run` returns only when cancelled (or on a bug)."""

    def __init__(self, sensor_id: str, settings: SerialSettings, protocol: LineProtocol) -> None:
        self.sensor_id = sensor_id
        self.settings = settings
        self.protocol = protocol
        self.reopens = 0
        self.spurious_wakes = 0
        self._available = False
        self._reason = "not started"
        self._opened_once = False
        self._session: _Session | None = None

    @property
    def link(self) -> SerialLink | None:
        """The open port, or None between sessions."""
        session = self._session
        return session.link if session is not None and not session.lost.done() else None

    def state(self) -> DriverState:
        counters = {
            **self.protocol.counters(),
            "reopens": self.reopens,
            "spurious_wakes": self.spurious_wakes,
        }
        return DriverState(available=self._available, reason=self._reason, counters=counters)

    async def run(self, emit: Emit) -> None:
        delay = BACKOFF_INITIAL_S
        port_name = self.settings.port
        try:
            while True:
                frames = 0
                try:
                    port = self._open()
                except (serial.SerialException, OSError) as exc:
                    self._set_unavailable(f"cannot open {port_name}: {_why(exc)}")
                else:
                    session = _Session(self, port, emit)
                    self._session = session
                    try:
                        await session.serve()
                    except (LinkLost, serial.SerialException, OSError) as exc:
                        self._set_unavailable(f"port lost: {exc}")
                    finally:
                        self._session = None
                        frames = session.frames
                        port.close()
                if frames:
                    delay = BACKOFF_INITIAL_S
                _log.info("%s: retrying %s in %.1f s", self.sensor_id, port_name, delay)
                await asyncio.sleep(delay)
                delay = next_backoff(delay)
        finally:
            self._available = False
            self._reason = "stopped"

    def _open(self) -> serial.Serial:
        port = serial.Serial(
            self.settings.port,
            self.settings.baud,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            timeout=0,
            xonxoff=False,  # it would swallow 0x11/0x13 inside binary frames
            rtscts=False,
            # one owner per port: a second poller (another agent, a stray minicom) is refused
            exclusive=True,
        )
        if self._opened_once:
            self.reopens += 1
        self._opened_once = True
        _log.info("%s: opened %s at %d baud", self.sensor_id, self.settings.port, port.baudrate)
        return port

    def mark_alive(self) -> None:
        if not self._available:
            _log.info("%s: receiving frames", self.sensor_id)
        self._available = True
        self._reason = "ok"

    def mark_silent(self, timeout: float, *, garbage: bool = False) -> None:
        """No frame for `timeout` s; `garbage`: bytes did arrive, none of them a frame."""
        if garbage:
            self._set_unavailable(f"no valid frame for {timeout:g} s, only {GARBAGE}")
        else:
            self._set_unavailable(f"silent for {timeout:g} s")

    def _set_unavailable(self, reason: str) -> None:
        if reason != self._reason:  # each retry logs its delay; the reason once
            _log.warning("%s: unavailable: %s", self.sensor_id, reason)
        self._available = False
        self._reason = reason


def _why(exc: BaseException) -> str:
    """The reason an open failed: the system's words for its errno (pyserial repeats the
    port twice around them), else the exception's text."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        return str(exc)
    if code == errno.EAGAIN:  # flock(LOCK_NB) of `exclusive=True`: someone holds the port
        return "in use by another program (it holds the lock)"
    return os.strerror(code)
