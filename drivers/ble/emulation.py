"""The part of a BLE sensor emulator every family shares: a device on a mock BlueZ that
advertises on a schedule from one background thread.

`AdvertisingEmulator` adds its device to a `MockBlueZ`, then every
`interval_s` (plus up to 10 ms of random delay, as real firmware adds) asks
the family subclass for the next payload and sends it `repeats` times, as
sensors repeat each measurement. Common faults: duplicates on demand,
silence, and the device being removed from BlueZ and coming back. RSSI
drifts slowly. Families add their own payloads and faults.

Trust: callers are trusted test code; the schedule is best effort (a thread
woken by a timer), which is how real advertising behaves too.
"""

from __future__ import annotations

import random
import threading
from types import TracebackType
from typing import Self

from drivers.ble.mockbluez import MockBlueZ, MockBlueZError

_JITTER_S = 0.010


class AdvertisingEmulator:
    """A BLE sensor on a mock BlueZ; use as a context manager or call start() and stop()."""

    family = "ble"

    def __init__(
        self,
        bluez: MockBlueZ,
        address: str,
        *,
        interval_s: float = 1.0,
        repeats: int = 1,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if interval_s <= 0 or repeats < 1:
            raise ValueError("interval_s must be positive and repeats at least 1")
        self.bluez = bluez
        self.address = address.upper()
        self.name = name or f"{self.family} {self.address[-5:].replace(':', '')}"
        self.interval_s = interval_s
        self.repeats = repeats
        self.rng = random.Random(seed)
        self.advertisements_sent = 0
        self.delivery_failures = 0
        self._rssi = -70.0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._silent = False
        self._present = False
        self._last: bytes | None = None

    # -- lifecycle ----------------------------------------------------------------------

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
        """Add the device to BlueZ and start advertising."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        self.restore()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"{self.family}-emulator")
        self._thread.start()

    def stop(self) -> None:
        """Stop advertising and remove the device (if BlueZ still runs)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        try:
            self.remove()
        except MockBlueZError:
            self._present = False  # BlueZ (or the whole bus) is already gone

    # -- common faults ------------------------------------------------------------------

    def set_silent(self, silent: bool) -> None:
        """While silent the device sends nothing (out of range, battery flat)."""
        with self._lock:
            self._silent = silent

    def send_duplicates(self, count: int) -> None:
        """Send the last advertisement `count` more times, byte for byte."""
        with self._lock:
            if self._last is None:
                raise RuntimeError("nothing advertised yet")
            for _ in range(count):
                self._send(self._last)

    def remove(self) -> None:
        """BlueZ forgets the device (as after a long absence); advertising pauses."""
        with self._lock:
            if self._present and self.bluez.has_device(self.address):
                self.bluez.remove_device(self.address)
            self._present = False

    def restore(self) -> None:
        """The device is seen again: BlueZ adds it and advertising resumes."""
        with self._lock:
            if not self.bluez.has_device(self.address):
                self.bluez.add_device(self.address, self.name, rssi=round(self._rssi))
            self._present = True

    # -- for subclasses -----------------------------------------------------------------

    def next_payload(self) -> bytes:
        """The payload of the next measurement (called with the lock held)."""
        raise NotImplementedError

    def deliver(self, payload: bytes, rssi: int) -> None:
        """Put `payload` on the air through the mock BlueZ."""
        raise NotImplementedError

    def walk(self, value: float, sigma: float, low: float, high: float) -> float:
        """One step of a clamped random walk: realistic, slowly varying values."""
        return min(max(value + self.rng.gauss(0.0, sigma), low), high)

    # -- the device thread -----------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._present and not self._silent:
                    payload = self.next_payload()
                    try:
                        for _ in range(self.repeats):
                            self._send(payload)
                    except MockBlueZError:
                        self.delivery_failures += 1  # BlueZ stopped under us: keep trying
            self._stop.wait(self.interval_s + self.rng.uniform(0.0, _JITTER_S))

    def _send(self, payload: bytes) -> None:
        if not self._present or self._silent:
            return
        self._rssi = self.walk(self._rssi, 1.5, -95.0, -45.0)
        self.deliver(payload, round(self._rssi))
        self._last = payload
        self.advertisements_sent += 1
