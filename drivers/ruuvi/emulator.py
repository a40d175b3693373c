"""A RuuviTag (data format 5) or Ruuvi Air (format 6) advertising on a mock BlueZ.

The device side for tests, demos and emulated HIL rigs: a `MockBlueZ` device
whose manufacturer data (company 0x0499) carries payloads built with the
codec's encoders, with slowly varying values (seeded random walks), an
increasing measurement sequence (16 bits for DF5, 8 for DF6, wrapping as the
firmware does), each measurement advertised `repeats` times. Faults on
demand: duplicate advertisements, fields sent as their "not available"
sentinel, silence, and the device removed from BlueZ.

Trust: callers are trusted test code.
"""

from __future__ import annotations

from drivers.ble.emulation import AdvertisingEmulator
from drivers.ble.mockbluez import MockBlueZ
from drivers.ruuvi import codec

_G = 9.80665


class RuuviEmulator(AdvertisingEmulator):
    """One emulated Ruuvi device; `sent_payloads` holds every measurement sent, in order."""

    family = "ruuvi"

    def __init__(
        self,
        bluez: MockBlueZ,
        address: str,
        *,
        data_format: int = codec.DF5,
        interval_s: float = 1.0,
        repeats: int = 2,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if data_format not in (codec.DF5, codec.DF6):
            raise ValueError(f"data format must be 5 or 6, got {data_format}")
        super().__init__(
            bluez, address, interval_s=interval_s, repeats=repeats, seed=seed, name=name
        )
        self.data_format = data_format
        self.sent_payloads: list[bytes] = []
        rng = self.rng
        self._sequence = rng.randrange(0, 60000)
        self._movement = rng.randrange(0, 200)
        self._values: dict[str, float] = {
            "temperature": rng.uniform(5.0, 20.0),
            "humidity": rng.uniform(45.0, 80.0),
            "pressure": rng.uniform(99500.0, 102500.0),
        }
        if data_format == codec.DF5:
            self._values |= {
                "acceleration_x": 0.0,
                "acceleration_y": 0.0,
                "acceleration_z": _G,
                "battery": rng.uniform(2.9, 3.05),
                "tx_power": 4.0,
            }
        else:
            self._values |= {
                "pm2_5": rng.uniform(3.0, 15.0),
                "co2": rng.uniform(420.0, 700.0),
                "voc_index": 100.0,
                "nox_index": 1.0,
                "illuminance": rng.uniform(50.0, 800.0),
            }
        self._omit_next: set[str] = set()

    # -- faults ---------------------------------------------------------------------------

    def send_sentinels(self, quantities: list[str] | None = None) -> None:
        """Send the next measurement with `quantities` (all of them if None) marked
        "not available", as a tag with a failed sensor does."""
        with self._lock:
            self._omit_next = set(self._values) if quantities is None else set(quantities)

    # -- payloads ---------------------------------------------------------------------------

    def next_payload(self) -> bytes:
        values = self._step()
        for quantity in self._omit_next:
            values.pop(quantity, None)
        self._omit_next = set()
        if self.data_format == codec.DF5:
            self._sequence = (self._sequence + 1) % 65535  # 65535 means "not available"
            if self.rng.random() < 0.02:
                self._movement = (self._movement + 1) % 255  # 255 means "not available"
            payload = codec.encode_df5(values, self._sequence, self.address, self._movement)
        else:
            self._sequence = (self._sequence + 1) & 0xFF
            payload = codec.encode_df6(values, self._sequence, self.address)
        self.sent_payloads.append(payload)
        return payload

    def deliver(self, payload: bytes, rssi: int) -> None:
        self.bluez.advertise_manufacturer(self.address, codec.COMPANY_ID, payload, rssi=rssi)

    def _step(self) -> dict[str, float]:
        v = self._values
        v["temperature"] = self.walk(v["temperature"], 0.05, -30.0, 50.0)
        v["humidity"] = self.walk(v["humidity"], 0.2, 5.0, 100.0)
        v["pressure"] = self.walk(v["pressure"], 4.0, 95000.0, 106000.0)
        if self.data_format == codec.DF5:
            for axis in ("acceleration_x", "acceleration_y"):
                v[axis] = self.rng.gauss(0.0, 0.02)
            v["acceleration_z"] = _G + self.rng.gauss(0.0, 0.02)
            v["battery"] = max(v["battery"] - 0.00005, 2.0)
        else:
            v["pm2_5"] = self.walk(v["pm2_5"], 0.3, 0.0, 1000.0)
            v["co2"] = self.walk(v["co2"], 5.0, 400.0, 5000.0)
            v["voc_index"] = self.walk(v["voc_index"], 2.0, 1.0, 500.0)
            v["nox_index"] = self.walk(v["nox_index"], 0.3, 1.0, 500.0)
            v["illuminance"] = self.walk(v["illuminance"], 10.0, 0.0, 60000.0)
        return dict(v)
