"""An SPS30 on a pseudo-terminal: the device side for tests, demos and HIL rigs.

Built on `drivers.uart.PtyDevice` (the pty, the device thread, pacing at the
baud rate, noise, truncated frames, silence, unplug/replug). This module adds
the sensor's SHDLC side: it never talks unasked; it answers start and stop
measurement, read measured values (float or uint16 format, a new sample
every `sample_s`, an empty reply in between), sleep and wake-up, device
information, version, status register, fan cleaning and reset, each with the
state byte the real sensor would send (0x43 for a command not allowed in the
current state, 0x02 for an unknown one, 0x01 for a wrong data length). While
asleep its UART is off: the first byte received only switches it on, and
then only a wake-up command within 100 ms is heard.

Trust: host frames are checked with the codec; malformed ones are ignored,
as the real sensor does. Fault-injection calls are trusted test code.
"""

from __future__ import annotations

import struct
import time
from collections import deque

from drivers.sps30 import codec
from drivers.uart import PtyDevice

WAKE_WINDOW_S = 0.1  # after the wake edge the UART listens this long for the wake-up command
PRODUCT_TYPE = b"00080000\x00"
VERSION = bytes([2, 2, 0, 7, 0, 2, 0])  # firmware 2.2, hardware 7, SHDLC 2.0
FAN_FAILURE = 1 << 4

Sample = tuple[float, ...]


class Sps30Emulator(PtyDevice):
    """Emulated sensor; use as a context manager or call start() and stop()."""

    name = "sps30"

    def __init__(
        self,
        *,
        sample_s: float = 1.0,
        seed: int = 0,
        asleep: bool = False,
        measuring: bool = False,
        link: str | None = None,
        baud: int = 115200,
    ) -> None:
        super().__init__(baud=baud, period_s=None, seed=seed, link=link)
        self.sample_s = sample_s
        self.serial_number = f"EMU{seed:013d}"
        self.commands: list[tuple[int, bytes]] = []
        self.samples_sent = 0
        self.empty_reads = 0
        self._first_asleep = asleep  # only for the first power-up: "left asleep by someone"
        self._first_measuring = measuring
        self._parser = codec.StreamParser(miso=False)
        self._pm2_5 = 6.0 + 4.0 * self.rng.random()
        self._sent: deque[Sample] = deque(maxlen=1024)
        self._asleep = False
        self._listening_until = 0.0  # asleep: UART switched on by an edge until then
        self._measuring = False
        self._format = codec.FORMAT_FLOAT
        self._next_sample = 0.0
        self._state_errors: deque[int] = deque()
        self._device_error = False
        self._ignore = 0

    # -- observation ---------------------------------------------------------------------

    def sent_values(self) -> list[Sample]:
        """The ten values of every sample read by the host, as the codec decodes them."""
        with self.lock:
            return list(self._sent)

    @property
    def asleep(self) -> bool:
        return self._asleep

    @property
    def measuring(self) -> bool:
        return self._measuring

    @property
    def output_format(self) -> int:
        return self._format

    # -- fault injection ------------------------------------------------------------------

    def inject_state_error(self, state: int = codec.STATE_NOT_ALLOWED) -> None:
        """Answer the next command with this state byte and no data."""
        self.call(lambda: self._state_errors.append(state))

    def set_device_error(self, failing: bool) -> None:
        """Raise (or clear) a fan failure: state bit 7 on every reply, bit 4 in the status."""

        def apply() -> None:
            self._device_error = failing

        self.call(apply)

    def ignore_commands(self, count: int) -> None:
        """Let the next `count` valid commands go unanswered (a reply lost on the line)."""

        def apply() -> None:
            self._ignore = count

        self.call(apply)

    def power_cycle(self) -> None:
        """Lose power for a moment on the same port: the measurement stops, the sensor idles."""
        self.call(self.power_on)

    # -- PtyDevice hooks --------------------------------------------------------------------

    def power_on(self) -> None:
        self._asleep = self._first_asleep
        self._measuring = self._first_measuring
        self._first_asleep = self._first_measuring = False
        self._listening_until = 0.0
        self._parser.reset()
        self._state_errors.clear()
        self._ignore = 0
        self._next_sample = time.monotonic() + self.sample_s

    def spare_frame(self) -> bytes:
        return codec.miso_frame(codec.CMD_READ, 0, self._encode(self._walk()))

    def bad_frame(self) -> bytes:
        data = self._encode(self._walk())
        return codec.miso_frame(codec.CMD_READ, 0, data, checksum_delta=1)

    def on_input(self, data: bytes) -> None:
        if self._asleep:
            now = time.monotonic()
            if now >= self._listening_until:
                self._parser.reset()
                self._listening_until = now + WAKE_WINDOW_S
                data = data[1:]  # this byte only woke the UART
        for _address, cmd, _state, payload in self._parser.feed(data):
            with self.lock:
                self.commands.append((cmd, payload))
            self._handle(cmd, payload)

    # -- the sensor --------------------------------------------------------------------------

    def _handle(self, cmd: int, data: bytes) -> None:
        if self._asleep:
            if cmd == codec.CMD_WAKE and time.monotonic() < self._listening_until:
                self._asleep = False
                self._reply(cmd, 0)
            return
        if self._ignore:
            self._ignore -= 1
            return
        if self._state_errors:
            self._reply(cmd, self._state_errors.popleft())
            return
        handler = {
            codec.CMD_START: self._start,
            codec.CMD_STOP: self._stop,
            codec.CMD_READ: self._read,
            codec.CMD_SLEEP: self._sleep,
            codec.CMD_WAKE: lambda _d: self._reply(codec.CMD_WAKE, codec.STATE_NOT_ALLOWED),
            codec.CMD_INFO: self._info,
            codec.CMD_VERSION: lambda _d: self._reply(codec.CMD_VERSION, 0, VERSION),
            codec.CMD_STATUS: self._status,
            codec.CMD_CLEAN: self._clean,
            codec.CMD_RESET: self._reset,
        }.get(cmd)
        if handler is None:
            self._reply(cmd, 0x02)  # unknown command
        else:
            handler(data)

    def _reply(self, cmd: int, state: int, data: bytes = b"") -> None:
        if self._device_error:
            state |= codec.STATE_ERROR_FLAG
        self.send(codec.miso_frame(cmd, state, data if not state & 0x7F else b""))

    def _start(self, data: bytes) -> None:
        if len(data) != 2:
            self._reply(codec.CMD_START, 0x01)
        elif data[0] != 0x01 or data[1] not in (codec.FORMAT_FLOAT, codec.FORMAT_UINT16):
            self._reply(codec.CMD_START, 0x04)
        elif self._measuring:
            self._reply(codec.CMD_START, codec.STATE_NOT_ALLOWED)
        else:
            self._measuring = True
            self._format = data[1]
            self._next_sample = time.monotonic() + self.sample_s
            self._reply(codec.CMD_START, 0)

    def _stop(self, _data: bytes) -> None:
        state = 0 if self._measuring else codec.STATE_NOT_ALLOWED
        self._measuring = False
        self._reply(codec.CMD_STOP, state)

    def _read(self, _data: bytes) -> None:
        if not self._measuring:
            self._reply(codec.CMD_READ, codec.STATE_NOT_ALLOWED)
            return
        now = time.monotonic()
        if now < self._next_sample:
            with self.lock:
                self.empty_reads += 1
            self._reply(codec.CMD_READ, 0)
            return
        self._next_sample = max(self._next_sample + self.sample_s, now)
        sample = self._walk()
        data = self._encode(sample)
        with self.lock:
            self.samples_sent += 1
            self._sent.append(tuple(v for _q, _u, v in codec.measured_values(data)))
        self._reply(codec.CMD_READ, 0, data)

    def _sleep(self, _data: bytes) -> None:
        if self._measuring:
            self._reply(codec.CMD_SLEEP, codec.STATE_NOT_ALLOWED)
            return
        self._reply(codec.CMD_SLEEP, 0)
        self._asleep = True
        self._listening_until = 0.0

    def _info(self, data: bytes) -> None:
        if len(data) != 1:
            self._reply(codec.CMD_INFO, 0x01)
        elif data[0] == codec.INFO_PRODUCT_TYPE:
            self._reply(codec.CMD_INFO, 0, PRODUCT_TYPE)
        elif data[0] == codec.INFO_SERIAL:
            self._reply(codec.CMD_INFO, 0, self.serial_number.encode() + b"\x00")
        else:
            self._reply(codec.CMD_INFO, 0x04)

    def _status(self, _data: bytes) -> None:
        register = FAN_FAILURE if self._device_error else 0
        self._reply(codec.CMD_STATUS, 0, register.to_bytes(4, "big") + b"\x00")

    def _clean(self, _data: bytes) -> None:
        self._reply(codec.CMD_CLEAN, 0 if self._measuring else codec.STATE_NOT_ALLOWED)

    def _reset(self, _data: bytes) -> None:
        self._reply(codec.CMD_RESET, 0)
        self._measuring = False

    # -- values ---------------------------------------------------------------------------

    def _walk(self) -> Sample:
        """A slowly varying sample: a clamped random walk on PM2.5, the rest derived from it
        (mass and number concentrations cumulative over size, as the sensor reports them)."""
        rng = self.rng
        self._pm2_5 = min(max(self._pm2_5 + rng.gauss(0.0, 0.3), 0.5), 900.0)
        pm2_5 = self._pm2_5
        pm1 = pm2_5 * 0.9
        nc0_5 = pm2_5 * 6.5 + rng.uniform(0.0, 2.0)
        nc1 = nc0_5 * 1.17
        size = 0.45 + 0.2 * rng.random()
        values = (pm1, pm2_5, pm2_5 * 1.03, pm2_5 * 1.05, nc0_5, nc1, nc1 * 1.01, nc1 * 1.012)
        return (*values, nc1 * 1.013, size)

    def _encode(self, sample: Sample) -> bytes:
        if self._format == codec.FORMAT_UINT16:
            words = [round(v) for v in sample[:9]] + [round(sample[9] * 1000)]
            return struct.pack(">10H", *words)
        rounded = [round(v, 2) for v in sample[:9]] + [round(sample[9], 3)]
        return struct.pack(">10f", *rounded)
