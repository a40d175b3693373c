"""A PMS5003 on a pseudo-terminal: the device side for tests, demos and HIL rigs.

Built on `drivers.uart.PtyDevice`, which owns the pty, the device thread,
the pacing at the baud rate and the generic faults (noise, truncated frames,
silence, unplug/replug). This module adds the sensor itself: frames from a
seeded random walk, streamed in active mode or answered on passive reads;
mode and sleep commands acknowledged; after a wake from sleep the fan warms
up and the sensor sends all-zero frames for `warmup_s`.

Trust: commands from the host are checked with the codec; malformed ones are
ignored, as the real sensor does. Fault-injection calls are trusted test code.

`unplug()` closes the pty; `replug()` makes a new pair, so `port` changes.
Pass `link` to get a stable symlink that is re-pointed on every replug.
"""

from __future__ import annotations

import time
from collections import deque

from drivers.pms5003 import codec
from drivers.uart import PtyDevice

_ZERO_WORDS = [0] * 12 + [0x9700]


class Pms5003Emulator(PtyDevice):
    """Emulated sensor; use as a context manager or call start() and stop()."""

    name = "pms5003"

    def __init__(
        self,
        *,
        period_s: float = 1.0,
        seed: int = 0,
        mode: str = "active",
        wait_for_host: bool = False,
        link: str | None = None,
        baud: int = 9600,
        warmup_s: float = 1.0,
    ) -> None:
        if mode not in ("active", "passive"):
            raise ValueError(f"mode must be active or passive, got {mode!r}")
        super().__init__(
            baud=baud, period_s=period_s, seed=seed, wait_for_host=wait_for_host, link=link
        )
        self.warmup_s = warmup_s
        self.frames_sent = 0
        self.zero_frames_sent = 0
        self.commands: list[tuple[int, int]] = []
        self._initial_mode = mode
        self._pm2_5 = 8.0 + 4.0 * self.rng.random()
        self._sent: deque[tuple[int, int, int]] = deque(maxlen=1024)
        self._inbox = b""
        self._active = mode == "active"
        self._asleep = False
        self._warm_at = 0.0  # monotonic time at which the fan has warmed up

    # -- observation ---------------------------------------------------------------------

    def sent_values(self) -> list[tuple[int, int, int]]:
        """Atmospheric (pm1, pm2_5, pm10) of the recent valid frames sent, oldest first
        (all-zero warm-up frames are not included)."""
        with self.lock:
            return list(self._sent)

    @property
    def asleep(self) -> bool:
        return self._asleep

    # -- PtyDevice hooks -------------------------------------------------------------------

    def power_on(self) -> None:
        self._active = self._initial_mode == "active"
        self._asleep = False
        self._inbox = b""

    def streaming(self) -> bool:
        return self._active and not self._asleep

    def next_frame(self) -> bytes:
        if time.monotonic() < self._warm_at:
            with self.lock:
                self.zero_frames_sent += 1
            return codec.encode_frame(_ZERO_WORDS)
        words = self._next_words()
        with self.lock:
            self.frames_sent += 1
            self._sent.append((words[3], words[4], words[5]))
        return codec.encode_frame(words)

    def spare_frame(self) -> bytes:
        return codec.encode_frame(self._next_words())

    def bad_frame(self) -> bytes:
        return codec.encode_frame(self._next_words(), checksum_delta=1)

    def on_input(self, data: bytes) -> None:
        inbox = self._inbox + data
        while True:
            start = inbox.find(codec.HEADER)
            if start < 0:
                inbox = inbox[-1:]
                break
            if len(inbox) - start < codec.COMMAND_LEN:
                inbox = inbox[start:]
                break
            try:
                cmd, arg = codec.parse_command(inbox[start : start + codec.COMMAND_LEN])
            except ValueError:
                inbox = inbox[start + 1 :]
                continue
            inbox = inbox[start + codec.COMMAND_LEN :]
            self._handle(cmd, arg)
        self._inbox = inbox

    # -- the sensor ------------------------------------------------------------------------

    def _handle(self, cmd: int, arg: int) -> None:
        with self.lock:
            self.commands.append((cmd, arg))
        if cmd == codec.CMD_MODE and arg in (codec.MODE_ACTIVE, codec.MODE_PASSIVE):
            self._active = arg == codec.MODE_ACTIVE
            self.send(codec.ack_frame(cmd, arg))
            self.restart_period()
        elif cmd == codec.CMD_READ and not (self._active or self._asleep or self.silent):
            self.send(self.next_frame())
        elif cmd == codec.CMD_SLEEP and arg == codec.SLEEP:
            self._asleep = True
            self.send(codec.ack_frame(cmd, arg))
        elif cmd == codec.CMD_SLEEP and arg == codec.WAKE and self._asleep:
            self._asleep = False  # no reply: the fan starts, frames follow once it runs
            self._warm_at = time.monotonic() + self.warmup_s
            self.restart_period()

    def _next_words(self) -> list[int]:
        """A slowly varying sample: a clamped random walk on PM2.5, the rest derived."""
        rng = self.rng
        self._pm2_5 = min(max(self._pm2_5 + rng.gauss(0.0, 0.6), 0.0), 400.0)
        pm25 = round(self._pm2_5)
        pm1 = round(self._pm2_5 * 0.7)
        pm10 = round(self._pm2_5 * 1.25 + rng.random())
        # CF=1 equals atmospheric in clean air and reads higher in dense smoke
        cf = [round(v * (1.0 + max(v - 30, 0) / 100.0)) for v in (pm1, pm25, pm10)]
        n03 = round(30 * self._pm2_5 + rng.uniform(0, 40)) + 1
        counts = [n03, n03 // 3, n03 // 5, n03 // 9, n03 // 60, n03 // 200]
        return [*cf, pm1, pm25, pm10, *counts, 0x9700]
