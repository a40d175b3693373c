"""An A02YYUW or JSN-SR04T on a pseudo-terminal: ``FF H L SUM`` frames over a filling bin.

Built on `drivers.uart.PtyDevice` (pty, thread, pacing at the baud rate,
noise, truncation, silence, unplug/replug). In `auto` mode it sends a frame
every `period_s` (A02YYUW: 100-300 ms; JSN-SR04T mode 2: 100 ms); in
`triggered` mode (JSN-SR04T mode 3) it is quiet until the host sends 0x55
and then answers with exactly one frame per trigger byte. The distance
drifts slowly closer (the bin fills) with millimetre jitter; `force_mm`
pins the raw value (0 for no echo, 20 for the blind zone, 511 for a data
byte that is 0xFF).

Trust: bytes from the host other than the trigger are ignored, as the
sensor does. Fault-injection calls are trusted test code.
"""

from __future__ import annotations

from collections import deque

from drivers.a02yyuw import codec
from drivers.uart import PtyDevice


class A02yyuwEmulator(PtyDevice):
    """Emulated sensor; use as a context manager or call start() and stop()."""

    name = "a02yyuw"

    def __init__(
        self,
        *,
        model: str = "a02yyuw",
        mode: str = "auto",
        period_s: float = 0.1,
        seed: int = 0,
        link: str | None = None,
        baud: int = 9600,
        start_m: float = 1.2,
    ) -> None:
        if model not in codec.MODELS:
            raise ValueError(f"model must be one of {sorted(codec.MODELS)}, got {model!r}")
        if mode not in ("auto", "triggered"):
            raise ValueError(f"mode must be auto or triggered, got {mode!r}")
        super().__init__(baud=baud, period_s=period_s, seed=seed, link=link)
        self.model = model
        self.mode = mode
        self.triggers = 0
        self.frames_sent = 0
        self._low, self._high = codec.MODELS[model]
        self._surface_mm = start_m * 1000
        self._forced: int | None = None
        self._sent: deque[int] = deque(maxlen=4096)

    def sent_values(self) -> list[int]:
        """Raw mm of the recent frames with a valid checksum, oldest first (forced ones too)."""
        with self.lock:
            return list(self._sent)

    def force_mm(self, value: int | None) -> None:
        """Send `value` mm in every frame from now on; None goes back to the bin."""

        def apply() -> None:
            self._forced = value

        self.call(apply)

    # -- PtyDevice hooks ------------------------------------------------------------------

    def streaming(self) -> bool:
        return self.mode == "auto"

    def next_frame(self) -> bytes:
        value = self._next_value()
        with self.lock:
            self.frames_sent += 1
            self._sent.append(value)
        return codec.encode(value)

    def spare_frame(self) -> bytes:
        return codec.encode(self._next_value())

    def bad_frame(self) -> bytes:
        return codec.encode(self._next_value(), checksum_delta=1)

    def on_input(self, data: bytes) -> None:
        if self.mode != "triggered":
            return
        for byte in data:
            if byte == codec.TRIGGER[0] and not self.silent:
                with self.lock:
                    self.triggers += 1
                self.send(self.next_frame())

    def _next_value(self) -> int:
        if self._forced is not None:
            return self._forced
        self._surface_mm = max(self._surface_mm - abs(self.rng.gauss(0.5, 0.5)), self._low)
        seen = round(self._surface_mm + self.rng.gauss(0.0, 2.0))
        return min(max(seen, self._low), self._high)
