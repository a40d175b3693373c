"""Telling a new BLE measurement from a repeat of the last one.

BLE sensors send each measurement several times, and BlueZ hands the last
payload out again whenever only the signal strength changed, so a driver
sees most payloads more than once. With a sequence number (Ruuvi's
measurement sequence, BTHome's packet id) a repeat is the sequence of the
last measurement. Without one, a repeat is a byte-identical payload within
`window_s` of the last new one; after that the unchanged payload counts as a
fresh measurement, so a sensor reading a steady value still reports.

Pure: the caller passes the time.
"""

from __future__ import annotations

REPEAT_WINDOW_S = 60.0


class RepeatFilter:
    """Remembers the last measurement of one device."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        self.window_s = window_s
        self._sequence: int | None = None
        self._payload: bytes | None = None
        self._since = 0.0

    def is_repeat(self, sequence: int | None, payload: bytes, now: float) -> bool:
        """Whether this payload repeats the last measurement; if not, it becomes the last."""
        if sequence is not None:
            repeated = sequence == self._sequence
        else:
            repeated = (
                self._sequence is None
                and payload == self._payload
                and now - self._since < self.window_s
            )
        if not repeated:
            self._sequence, self._payload, self._since = sequence, bytes(payload), now
        return repeated
