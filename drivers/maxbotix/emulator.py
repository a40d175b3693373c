"""A MaxSonar on a pseudo-terminal: free-running range frames over a bin that slowly fills.

Built on `drivers.uart.PtyDevice` (pty, thread, pacing at the baud rate,
noise, truncation, silence, unplug/replug). The emulated target is the
surface of a bin's contents: its distance drifts slowly closer (the bin
fills) with a few millimetres of jitter, clamped to the model's range (HRXL
reports anything closer than 300 mm as 300). `set_no_target(True)` makes it
send the model's no-target value (HRXL 5000 / 9999; XL and LV, which have
none, send their maximum), as an empty bin or a lost echo would.

Trust: the sensor ignores everything the host sends (free-run mode).
Fault-injection calls are trusted test code.
"""

from __future__ import annotations

from collections import deque

from drivers.maxbotix import codec
from drivers.uart import PtyDevice

# model -> (digits, frame period in s); HRXL 6-7.5 Hz, XL ~10 Hz, LV ~20 Hz
_TIMING = {"hrxl": (4, 0.15), "hrxl_10m": (4, 0.15), "xl": (3, 0.1), "lv": (3, 0.05)}
_HRXL_MIN = 300


class MaxbotixEmulator(PtyDevice):
    """Emulated sensor; use as a context manager or call start() and stop()."""

    name = "maxbotix"

    def __init__(
        self,
        *,
        model: str = "hrxl",
        period_s: float | None = None,
        seed: int = 0,
        link: str | None = None,
        baud: int = 9600,
        start_m: float = 1.5,
    ) -> None:
        if model not in codec.MODELS:
            raise ValueError(f"model must be one of {sorted(codec.MODELS)}, got {model!r}")
        digits, default_period = _TIMING[model]
        super().__init__(baud=baud, period_s=period_s or default_period, seed=seed, link=link)
        self.model = model
        self.digits = digits
        num, den, _allowed, no_target, largest = codec.MODELS[model]
        self._metres_per_count = num / den
        self._no_target_value = no_target[0] if no_target else largest
        self._largest = largest
        self._smallest = _HRXL_MIN if model.startswith("hrxl") else 6
        self._surface_m = start_m
        self._no_target = False
        self.frames_sent = 0
        self.no_echo_sent = 0
        self._sent: deque[int] = deque(maxlen=4096)

    def sent_values(self) -> list[int]:
        """Raw values (model units) of the recent valid range frames, oldest first."""
        with self.lock:
            return list(self._sent)

    def sent_distances(self) -> list[float]:
        """The same, as the distances in metres a driver should report."""
        return [codec.records(v, self.digits, self.model)[0][2] for v in self.sent_values()]

    def set_no_target(self, flag: bool) -> None:
        """Send the no-target value instead of ranges (nothing in the beam)."""

        def apply() -> None:
            self._no_target = flag

        self.call(apply)

    # -- PtyDevice hooks ------------------------------------------------------------------

    def next_frame(self) -> bytes:
        if self._no_target:
            with self.lock:
                self.no_echo_sent += 1
            return codec.frame_for(self._no_target_value, self.digits)
        value = self._next_value()
        with self.lock:
            self.frames_sent += 1
            self._sent.append(value)
        return codec.frame_for(value, self.digits)

    def spare_frame(self) -> bytes:
        return codec.frame_for(self._next_value(), self.digits)

    def bad_frame(self) -> bytes:
        """No checksum to break: a frame with one digit garbled, as line noise would."""
        frame = bytearray(self.spare_frame())
        frame[1 + self.rng.randrange(self.digits)] = self.rng.choice(b"X?:/")
        return bytes(frame)

    def _next_value(self) -> int:
        """The bin fills slowly (about 1 mm per frame) with a few mm of jitter."""
        self._surface_m = max(self._surface_m - abs(self.rng.gauss(0.0005, 0.0005)), 0.0)
        seen = self._surface_m + self.rng.gauss(0.0, 0.002)
        value = round(seen / self._metres_per_count)
        return min(max(value, self._smallest), self._largest)
