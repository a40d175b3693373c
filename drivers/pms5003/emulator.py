"""A PMS5003 on a pseudo-terminal: the device side for tests, demos and HIL rigs.

The emulator owns a pty pair. The host opens `port` (the slave path) exactly
as it would open /dev/ttyAMA0; the emulator talks through the master side
from one background thread. It streams frames in active mode, answers
passive reads, acknowledges mode and sleep commands, and can misbehave on
request (noise, bad checksums, silence, unplug).

Trust: commands from the host are checked with the codec; malformed ones are
ignored, as the real sensor does. Fault-injection calls are trusted test code.

`unplug()` closes the pty; `replug()` makes a new pair, so `port` changes.
Pass `link` to get a stable symlink that is re-pointed on every replug.
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

from drivers.pms5003 import codec

_Request = tuple[Callable[[], None], threading.Event]


class Pms5003Emulator:
    """Emulated sensor; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        *,
        period_s: float = 1.0,
        seed: int = 0,
        mode: str = "active",
        wait_for_host: bool = False,
        link: str | None = None,
    ) -> None:
        if mode not in ("active", "passive"):
            raise ValueError(f"mode must be active or passive, got {mode!r}")
        self.period_s = period_s
        self.wait_for_host = wait_for_host
        self.link = link
        self.port = ""
        self.frames_sent = 0
        self.bad_frames_sent = 0
        self.commands: list[tuple[int, int]] = []
        self._initial_mode = mode
        self._rng = random.Random(seed)
        self._pm2_5 = 8.0 + 4.0 * self._rng.random()
        self._lock = threading.Lock()
        self._sent: deque[tuple[int, int, int]] = deque(maxlen=1024)
        self._requests: deque[_Request] = deque()
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._silent = False
        self._active = mode == "active"
        self._asleep = False
        self._host_seen = False

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> Pms5003Emulator:
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
        self._plug()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="pms5003-emulator")
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
        if self.link is not None and os.path.islink(self.link):
            os.unlink(self.link)

    # -- observation ------------------------------------------------------------

    def sent_values(self) -> list[tuple[int, int, int]]:
        """Atmospheric (pm1, pm2_5, pm10) of the recent valid frames sent, oldest first."""
        with self._lock:
            return list(self._sent)

    # -- fault injection ----------------------------------------------------------

    def inject_noise(self, n_bytes: int) -> None:
        """Send `n_bytes` random bytes, as a loose connector or a shared line would."""
        self._call(lambda: self._write(self._rng.randbytes(n_bytes)))

    def inject_bad_checksum(self) -> None:
        """Send one frame whose checksum is off by one."""
        self._call(lambda: self._send_frame(checksum_delta=1))

    def set_silent(self, silent: bool) -> None:
        """While silent the sensor sends nothing at all (commands are still read)."""

        def apply() -> None:
            self._silent = silent

        self._call(apply)

    def unplug(self) -> None:
        """Close the pty so that the host sees a hang-up."""
        self._call(self._unplug)

    def replug(self) -> None:
        """Power the sensor up on a new pty; `port` changes, `link` follows it."""

        def apply() -> None:
            self._unplug()
            self._power_on()
            self._plug()

        self._call(apply)

    # -- device thread -------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the device thread (or here if it is not running) and wait for it."""
        if self._thread is None:
            fn()
            return
        done = threading.Event()
        with self._lock:
            self._requests.append((fn, done))
        os.write(self._wake_w, b"x")
        if not done.wait(timeout=10.0):
            raise TimeoutError("emulator thread did not answer")

    def _serve(self) -> None:
        inbox = b""
        next_frame = 0.0
        clock = time.monotonic
        while not self._stopping:
            fds = [self._wake_r] if self._master is None else [self._wake_r, self._master]
            timeout = max(next_frame - clock(), 0.0) if self._streaming() else None
            readable, _, _ = select.select(fds, [], [], timeout)
            if self._wake_r in readable:
                os.read(self._wake_r, 64)
                had_master = self._master
                self._run_requests()
                if self._master != had_master:
                    inbox = b""
                    continue
            if self._master is not None and self._master in readable:
                inbox = self._read_commands(inbox)
            if self._streaming() and clock() >= next_frame:
                self._send_frame()
                next_frame = clock() + self.period_s
            elif not self._streaming():
                next_frame = clock()  # stream resumes at once after wake or mode change

    def _run_requests(self) -> None:
        while True:
            with self._lock:
                if not self._requests:
                    return
                fn, done = self._requests.popleft()
            try:
                fn()
            finally:
                done.set()

    def _read_commands(self, inbox: bytes) -> bytes:
        assert self._master is not None
        try:
            data = os.read(self._master, 256)
        except BlockingIOError:
            return inbox
        except OSError:  # EIO: no process holds the slave open right now
            return inbox
        inbox += data
        while True:
            start = inbox.find(codec.HEADER)
            if start < 0:
                return inbox[-1:]
            if len(inbox) - start < codec.COMMAND_LEN:
                return inbox[start:]
            try:
                cmd, arg = codec.parse_command(inbox[start : start + codec.COMMAND_LEN])
            except ValueError:
                inbox = inbox[start + 1 :]
                continue
            inbox = inbox[start + codec.COMMAND_LEN :]
            self._handle(cmd, arg)

    def _handle(self, cmd: int, arg: int) -> None:
        with self._lock:
            self.commands.append((cmd, arg))
        self._host_seen = True
        if cmd == codec.CMD_MODE and arg in (codec.MODE_ACTIVE, codec.MODE_PASSIVE):
            self._active = arg == codec.MODE_ACTIVE
            self._write(codec.ack_frame(cmd, arg))
        elif cmd == codec.CMD_READ and not self._active and not self._asleep:
            self._send_frame()
        elif cmd == codec.CMD_SLEEP and arg == codec.SLEEP:
            self._asleep = True
            self._write(codec.ack_frame(cmd, arg))
        elif cmd == codec.CMD_SLEEP and arg == codec.WAKE:
            self._asleep = False

    def _streaming(self) -> bool:
        return (
            self._master is not None
            and self._active
            and not self._asleep
            and not self._silent
            and (self._host_seen or not self.wait_for_host)
        )

    # -- frames and fds -------------------------------------------------------------

    def _next_words(self) -> list[int]:
        """A slowly varying sample: a clamped random walk on PM2.5, the rest derived."""
        self._pm2_5 = min(max(self._pm2_5 + self._rng.gauss(0.0, 0.6), 0.0), 400.0)
        pm25 = round(self._pm2_5)
        pm1 = round(self._pm2_5 * 0.7)
        pm10 = round(self._pm2_5 * 1.25 + self._rng.random())
        # CF=1 equals atmospheric in clean air and reads higher in dense smoke
        cf = [round(v * (1.0 + max(v - 30, 0) / 100.0)) for v in (pm1, pm25, pm10)]
        n03 = round(30 * self._pm2_5 + self._rng.uniform(0, 40))
        counts = [n03, n03 // 3, n03 // 5, n03 // 9, n03 // 60, n03 // 200]
        return [*cf, pm1, pm25, pm10, *counts, 0x9700]

    def _send_frame(self, checksum_delta: int = 0) -> None:
        if self._silent or self._master is None:
            return
        words = self._next_words()
        self._write(codec.encode_frame(words, checksum_delta))
        with self._lock:
            if checksum_delta:
                self.bad_frames_sent += 1
            else:
                self.frames_sent += 1
                self._sent.append((words[3], words[4], words[5]))

    def _write(self, data: bytes) -> None:
        """Write to the line; like a UART with nobody listening, bytes that do not fit are lost."""
        if self._silent or self._master is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.write(self._master, data)

    def _power_on(self) -> None:
        self._active = self._initial_mode == "active"
        self._asleep = False
        self._host_seen = False

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.port = os.ttyname(slave)
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
