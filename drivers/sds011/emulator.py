"""An SDS011 on a pseudo-terminal: the device side for tests, demos and HIL rigs.

Built on `drivers.uart.PtyDevice` (the pty, the device thread, pacing at the
baud rate, noise, truncated frames, silence, unplug/replug). This module
adds the sensor: measurements from a seeded random walk, streamed once per
`period_s` in active mode (once per working period if one is set) or sent
on query; every command of the protocol answered with its C5 reply; sleep
and work; all-zero measurements for `warmup_s` after power-up or wake.

Like the real sensor, the emulator keeps its reporting mode, working period
and device id across `replug()` (a power cycle), ignores everything but the
work command while asleep, and ignores commands addressed to another id.

Trust: commands from the host are checked with the codec; malformed ones are
ignored, as the real sensor does. Fault-injection calls are trusted test code.
"""

from __future__ import annotations

import time
from collections import deque

from drivers.sds011 import codec
from drivers.uart import PtyDevice

_HOST_HEADER = bytes([codec.HEAD, codec.CMD_HOST])
FIRMWARE = (15, 7, 10)  # the protocol PDF's example: 2015-07-10


class Sds011Emulator(PtyDevice):
    """Emulated sensor; use as a context manager or call start() and stop().

    `minute_s` is the length of a "minute" of the working period, so that tests
    can run a 1-minute period in a fraction of a second.
    """

    name = "sds011"

    def __init__(
        self,
        *,
        period_s: float = 1.0,
        seed: int = 0,
        mode: str = "active",
        working_period_min: int = 0,
        minute_s: float = 60.0,
        warmup_s: float = 1.0,
        asleep: bool = False,
        device_id: int = 0xA160,
        wait_for_host: bool = False,
        link: str | None = None,
        baud: int = 9600,
    ) -> None:
        if mode not in ("active", "query"):
            raise ValueError(f"mode must be active or query, got {mode!r}")
        super().__init__(
            baud=baud, period_s=period_s, seed=seed, wait_for_host=wait_for_host, link=link
        )
        self.minute_s = minute_s
        self.warmup_s = warmup_s
        self.device_id = device_id
        self.frames_sent = 0
        self.zero_frames_sent = 0
        self.commands: list[tuple[int, bytes, int]] = []
        self._query_mode = mode == "query"  # persists across power cycles, like the sensor
        self._period_min = working_period_min
        self._start_asleep = asleep  # only for the first power-up: "left asleep by someone"
        self._pm2_5 = 80.0 + 40.0 * self.rng.random()  # tenths of ug/m3
        self._sent: deque[tuple[float, float]] = deque(maxlen=1024)
        self._inbox = b""
        self._asleep = False
        self._warm_at = 0.0
        self._report_at = 0.0
        self._ignore = 0

    # -- observation ---------------------------------------------------------------------

    def sent_values(self) -> list[tuple[float, float]]:
        """(pm2_5, pm10) of the recent non-zero measurements sent, oldest first."""
        with self.lock:
            return list(self._sent)

    @property
    def asleep(self) -> bool:
        return self._asleep

    @property
    def query_mode(self) -> bool:
        return self._query_mode

    @property
    def working_period_min(self) -> int:
        return self._period_min

    # -- fault injection ------------------------------------------------------------------

    def ignore_commands(self, count: int) -> None:
        """Let the next `count` valid commands go unanswered (a reply lost on the line)."""

        def apply() -> None:
            self._ignore = count

        self.call(apply)

    def inject_reply(self, sub: int = codec.SUB_FIRMWARE) -> None:
        """Send a reply nobody asked for (a late answer to an earlier command)."""
        self.call(lambda: self.send(self._reply(sub, *FIRMWARE)))

    # -- PtyDevice hooks --------------------------------------------------------------------

    def power_on(self) -> None:
        self._asleep = self._start_asleep
        self._start_asleep = False
        self._inbox = b""
        self._ignore = 0
        now = time.monotonic()
        self._warm_at = now + self.warmup_s
        self._report_at = now + self._period_min * self.minute_s

    def streaming(self) -> bool:
        return not self._query_mode and not self._asleep

    def next_frame(self) -> bytes | None:
        if self._period_min:
            now = time.monotonic()
            if now < self._report_at:
                return None
            self._report_at = now + self._period_min * self.minute_s
        return self._measurement()

    def spare_frame(self) -> bytes:
        pm2_5, pm10 = self._walk()
        return codec.data_frame(pm2_5, pm10, self.device_id)

    def bad_frame(self) -> bytes:
        pm2_5, pm10 = self._walk()
        return codec.data_frame(pm2_5, pm10, self.device_id, checksum_delta=1)

    def on_input(self, data: bytes) -> None:
        inbox = self._inbox + data
        while True:
            start = inbox.find(_HOST_HEADER)
            if start < 0:
                inbox = inbox[-1:] if inbox[-1:] == _HOST_HEADER[:1] else b""
                break
            if len(inbox) - start < codec.COMMAND_LEN:
                inbox = inbox[start:]
                break
            try:
                command = codec.parse_command(inbox[start : start + codec.COMMAND_LEN])
            except codec.FrameError:
                inbox = inbox[start + 1 :]
                continue
            inbox = inbox[start + codec.COMMAND_LEN :]
            self._handle(*command)
        self._inbox = inbox

    # -- the sensor --------------------------------------------------------------------------

    def _handle(self, sub: int, data: bytes, target: int) -> None:
        with self.lock:
            self.commands.append((sub, data, target))
        if target not in (codec.ANY_DEVICE, self.device_id):
            return
        wakes = sub == codec.SUB_SLEEP and data[0] == codec.SET and data[1] == codec.WORK
        if self._asleep and not wakes:
            return  # asleep: deaf to everything but "work"
        if self._ignore:
            self._ignore -= 1
            return
        setting = data[0] == codec.SET
        if sub == codec.SUB_MODE:
            if setting:
                self._query_mode = data[1] == codec.MODE_QUERY
                self.restart_period()
            self.send(self._reply(sub, data[0], int(self._query_mode), 0))
        elif sub == codec.SUB_QUERY:
            self.send(self._measurement())
        elif sub == codec.SUB_SET_ID:
            self.device_id = (data[10] << 8) | data[11]
            self.send(self._reply(sub, 0, 0, 0))
        elif sub == codec.SUB_SLEEP:
            if setting:
                self._set_asleep(data[1] != codec.WORK)
            self.send(self._reply(sub, data[0], int(not self._asleep), 0))
        elif sub == codec.SUB_FIRMWARE:
            self.send(self._reply(sub, *FIRMWARE))
        elif sub == codec.SUB_PERIOD:
            if setting and data[1] <= codec.MAX_PERIOD_MIN:
                self._period_min = data[1]
                self._report_at = time.monotonic() + self._period_min * self.minute_s
            self.send(self._reply(sub, data[0], self._period_min, 0))

    def _set_asleep(self, asleep: bool) -> None:
        if self._asleep and not asleep:
            self._warm_at = time.monotonic() + self.warmup_s
            self.restart_period()
        self._asleep = asleep

    def _reply(self, sub: int, d2: int, d3: int, d4: int) -> bytes:
        return codec.reply_frame(sub, d2, d3, d4, self.device_id)

    def _walk(self) -> tuple[int, int]:
        """A slowly varying sample in tenths of ug/m3: a clamped random walk on PM2.5."""
        self._pm2_5 = min(max(self._pm2_5 + self.rng.gauss(0.0, 3.0), 1.0), 9000.0)
        pm2_5 = round(self._pm2_5)
        return pm2_5, round(pm2_5 * 1.3 + self.rng.uniform(0.0, 10.0))

    def _measurement(self) -> bytes:
        if time.monotonic() < self._warm_at:
            with self.lock:
                self.zero_frames_sent += 1
            return codec.data_frame(0, 0, self.device_id)
        pm2_5, pm10 = self._walk()
        with self.lock:
            self.frames_sent += 1
            self._sent.append((pm2_5 / 10, pm10 / 10))
        return codec.data_frame(pm2_5, pm10, self.device_id)
