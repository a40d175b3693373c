"""The device side of a serial sensor: a pseudo-terminal that behaves like a UART.

`PtyDevice` is the base of every serial emulator. It owns a pty pair (slave
in raw mode; the host opens `port`, the slave path, as it would open
/dev/ttyAMA0) and one background thread that:

- sends the family's frames every `period_s` (hook `next_frame`),
- PACES all output at the configured baud rate, 10 bits per byte (start, 8
  data, stop), in small bursts, writing each byte only once its last bit
  would have left a real UART; a pty by itself delivers any amount at once,
- hands bytes from the host to the family (hook `on_input`), which answers
  through `send`,
- injects faults on request: noise, truncated frames, bad checksums (hook
  `bad_frame`), silence, unplug and replug (a new pty; `link`, if given, is
  a symlink re-pointed to it, and gone while unplugged, as udev removes the
  /dev/serial/by-id name of an unplugged adapter).

Trust: bytes from the host are unverified; families check them with their
codec and ignore what is malformed, as the real sensors do. The fault
injection calls are trusted test code.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Self

BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
BURST_S = 0.004  # output is written in bursts of about this much wire time
CATCH_UP_S = 0.004  # how far in the past a frame may start after a late wake-up
_Request = tuple[Callable[[], None], threading.Event]


def wire_time_s(n_bytes: int, baud: int) -> float:
    """Seconds a UART needs to send `n_bytes` at `baud` (8N1)."""
    return n_bytes * BITS_PER_BYTE / baud


class PtyDevice:
    """Base emulator; subclass it, override the hooks, use as a context manager.

    Hooks (all run on the device thread; keep them short):
      `next_frame()`  the next periodic frame, or None to send nothing this period
      `streaming()`   whether periodic output is on (mode, sleep); default True
      `on_input(data)` bytes written by the host; answer with `send`
      `bad_frame()`   a frame with a wrong checksum (for `inject_bad_checksum`)
      `spare_frame()` a valid frame not counted as sent (cut short by `inject_truncated`);
                      default `next_frame()`
      `power_on()`    reset device state; called at start and on every replug
    """

    name = "device"

    def __init__(
        self,
        *,
        baud: int = 9600,
        period_s: float | None = 1.0,
        seed: int = 0,
        wait_for_host: bool = False,
        link: str | None = None,
    ) -> None:
        self.baud = baud
        self.period_s = period_s
        self.wait_for_host = wait_for_host
        self.link = link
        self.port = ""
        self.rng = random.Random(seed)
        self.bytes_sent = 0
        self.truncated_sent = 0
        self.bad_frames_sent = 0
        self.lock = threading.Lock()  # guards what tests read while the thread runs
        self._byte_s = wire_time_s(1, baud)
        self._burst = max(1, round(BURST_S / self._byte_s))
        self._out = bytearray()
        self._run_start = 0.0  # wire time at which the first byte of the current run started
        self._run_sent = 0  # bytes of the current run already written
        self._next_frame_at = 0.0
        self._requests: deque[_Request] = deque()
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._silent = False
        self._host_seen = False

    # -- hooks ----------------------------------------------------------------------------

    def next_frame(self) -> bytes | None:
        return None

    def streaming(self) -> bool:
        return True

    def on_input(self, data: bytes) -> None:
        return None

    def bad_frame(self) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} cannot make a bad-checksum frame")

    def spare_frame(self) -> bytes | None:
        return self.next_frame()

    def power_on(self) -> None:
        return None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create the pty (and link) and start the device thread."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        self.power_on()
        self._plug()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-emulator")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, close every fd and remove the link."""
        if self._thread is not None:
            self._stopping = True
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._unplug()

    # -- for subclasses (device thread) ------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes for paced output; dropped while silent or unplugged."""
        self._queue(data, time.monotonic())

    def _queue(self, data: bytes, at: float, *, injected: bool = False) -> None:
        """Queue bytes whose first bit leaves at `at` (or when the wire is free); `injected`
        faults reach the line even while the device is silent."""
        if (self._silent and not injected) or self._master is None or not data:
            return
        if not self._out:
            # a late wake-up of this thread may start the run up to CATCH_UP_S in the past,
            # so scheduling delays do not add up to a slower line than the baud rate gives
            earliest = time.monotonic() - CATCH_UP_S
            self._run_start = max(at, earliest, self._wire_idle_at())
            self._run_sent = 0
        self._out += data

    @property
    def silent(self) -> bool:
        """True while `set_silent(True)` holds: `send` drops everything (injected faults
        still go out)."""
        return self._silent

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the device thread (or here if it is not running) and wait for it."""
        if self._thread is None:
            fn()
            return
        done = threading.Event()
        with self.lock:
            self._requests.append((fn, done))
        os.write(self._wake_w, b"x")
        if not done.wait(timeout=10.0):
            raise TimeoutError("emulator thread did not answer")

    def restart_period(self) -> None:
        """Send the next periodic frame now (e.g. after a wake-up or mode change)."""
        self._next_frame_at = time.monotonic()

    # -- fault injection ------------------------------------------------------------------------

    def _inject(self, data: bytes) -> None:
        self._queue(data, time.monotonic(), injected=True)

    def inject_noise(self, n_bytes: int) -> None:
        """Send `n_bytes` random bytes, as a loose connector or a shared line would (also
        while silent: a sensor that sends nothing does not stop the noise)."""
        self.call(lambda: self._inject(self.rng.randbytes(n_bytes)))

    def inject_truncated(self) -> None:
        """Send the first part of a frame only (at least one byte is missing)."""

        def apply() -> None:
            frame = self.spare_frame()
            if frame and len(frame) > 1:
                self._inject(frame[: self.rng.randrange(1, len(frame))])
                with self.lock:
                    self.truncated_sent += 1

        self.call(apply)

    def inject_bad_checksum(self) -> None:
        """Send one frame whose checksum is wrong."""

        def apply() -> None:
            self._inject(self.bad_frame())
            with self.lock:
                self.bad_frames_sent += 1

        self.call(apply)

    def set_silent(self, silent: bool) -> None:
        """While silent the device starts no new output (a frame on the wire finishes);
        input from the host is still read, and injected faults are still sent."""

        def apply() -> None:
            self._silent = silent

        self.call(apply)

    def unplug(self) -> None:
        """Close the pty so that the host sees a hang-up."""
        self.call(self._unplug)

    def replug(self) -> None:
        """Power the device up on a new pty; `port` changes, `link` follows it."""

        def apply() -> None:
            self._unplug()
            self.power_on()
            self._plug()

        self.call(apply)

    # -- device thread ----------------------------------------------------------------------------

    def _periodic(self) -> bool:
        return (
            self._master is not None
            and self.period_s is not None
            and not self._silent
            and (self._host_seen or not self.wait_for_host)
            and self.streaming()
        )

    def _serve(self) -> None:
        clock = time.monotonic
        while not self._stopping:
            fds = [self._wake_r] if self._master is None else [self._wake_r, self._master]
            readable, _, _ = select.select(fds, [], [], self._timeout(clock()))
            if self._wake_r in readable:
                os.read(self._wake_r, 64)
                self._run_requests()
            if self._master is not None and self._master in readable:
                self._read_input()
            now = clock()
            if not self._periodic():
                self._next_frame_at = now  # output resumes at once when streaming starts
            elif now >= self._next_frame_at and not self._out and self.period_s is not None:
                self._queue(self.next_frame() or b"", self._next_frame_at)
                started = self._run_start if self._out else now
                self._next_frame_at = started + self.period_s
            self._drain(clock())

    def _timeout(self, now: float) -> float | None:
        due: list[float] = []
        if self._periodic() and not self._out:  # a frame waits for the wire to be free
            due.append(self._next_frame_at)
        if self._out:
            due.append(
                self._run_start + (self._run_sent + min(self._burst, len(self._out))) * self._byte_s
            )
        return max(min(due) - now, 0.0) if due else None

    def _drain(self, now: float) -> None:
        """Write every queued byte whose 10 bits have left the wire by `now`."""
        if not self._out or self._master is None:
            return
        done = int((now - self._run_start) / self._byte_s) - self._run_sent
        if done <= 0:
            return
        chunk = bytes(self._out[:done])
        del self._out[:done]
        self._run_sent += len(chunk)
        with contextlib.suppress(BlockingIOError):  # nobody reading: bytes are lost, like a UART
            os.write(self._master, chunk)
        with self.lock:
            self.bytes_sent += len(chunk)

    def _wire_idle_at(self) -> float:
        return self._run_start + self._run_sent * self._byte_s

    def _run_requests(self) -> None:
        while True:
            with self.lock:
                if not self._requests:
                    return
                fn, done = self._requests.popleft()
            try:
                fn()
            finally:
                done.set()

    def _read_input(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: no process holds the slave open right now
            return
        if data:
            self._host_seen = True
            self.on_input(data)

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._host_seen = False
        self.port = os.ttyname(slave)
        self._next_frame_at = time.monotonic()
        if self.link is not None:
            tmp = f"{self.link}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(self.port, tmp)
            os.replace(tmp, self.link)

    def _unplug(self) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None
        self._out.clear()
        self._run_sent = 0
        # udev removes an unplugged adapter's name; a stale link would point at a pty
        # number that any process may get next, and the host would open a stranger's pty
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.link)
