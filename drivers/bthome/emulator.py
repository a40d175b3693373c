"""A BTHome v2 climate sensor advertising on a mock BlueZ, plain or encrypted.

The device side for tests, demos and emulated HIL rigs: a `MockBlueZ` device
whose service data (UUID 0xFCD2) carries a packet id, battery, temperature,
humidity and pressure built with `codec.encode`, with slowly varying values
(seeded random walks) and an increasing packet id. With a `key` every packet
is encrypted with `crypto.encrypt` under an increasing counter. Each
measurement is advertised `repeats` times, byte for byte. Faults on demand:
duplicates, a bad MIC, a replayed older packet, a plaintext packet from an
encrypting device, silence, and the device removed from BlueZ.

Trust: callers are trusted test code.
"""

from __future__ import annotations

from drivers.ble.emulation import AdvertisingEmulator
from drivers.ble.mockbluez import MockBlueZ
from drivers.bthome import codec, crypto

SERVICE_UUID = 0xFCD2
OBJ_BATTERY, OBJ_TEMPERATURE, OBJ_HUMIDITY, OBJ_PRESSURE = 0x01, 0x02, 0x03, 0x04


class BTHomeEmulator(AdvertisingEmulator):
    """One emulated BTHome device; `sent_plain` holds every measurement's plaintext."""

    family = "bthome"

    def __init__(
        self,
        bluez: MockBlueZ,
        address: str,
        *,
        key: bytes | None = None,
        interval_s: float = 1.0,
        repeats: int = 2,
        seed: int = 0,
        name: str | None = None,
        packet_ids: bool = True,
        trigger: bool = False,
    ) -> None:
        super().__init__(
            bluez, address, interval_s=interval_s, repeats=repeats, seed=seed, name=name
        )
        self.key = key
        self.packet_ids = packet_ids
        self.trigger = trigger
        self.sent_plain: list[bytes] = []
        self.sent_sealed: list[bytes] = []
        rng = self.rng
        self._packet_id = rng.randrange(0, 256)
        self.counter = rng.randrange(1000, 100000)  # the encryption counter of the next packet
        self._battery = rng.uniform(70.0, 100.0)
        self._temperature = rng.uniform(5.0, 20.0)
        self._humidity = rng.uniform(45.0, 80.0)
        self._pressure = rng.uniform(99500.0, 102500.0)
        self._corrupt_next = False
        self._plain_next = False

    # -- faults ---------------------------------------------------------------------------

    def send_bad_mic(self) -> None:
        """Send one encrypted packet whose MIC is wrong (a forged or corrupted packet)."""
        if self.key is None:
            raise RuntimeError("a device without a key sends no MIC")
        with self._lock:
            self._corrupt_next = True
            self._send(self.next_payload())

    def send_replay(self, back: int = 2) -> None:
        """Send again the encrypted packet of `back` measurements ago (an older counter)."""
        with self._lock:
            self._send(self.sent_sealed[-1 - back])

    def send_plaintext(self) -> None:
        """Send one unencrypted packet although the device normally encrypts."""
        with self._lock:
            self._plain_next = True
            self._send(self.next_payload())

    # -- payloads ---------------------------------------------------------------------------

    def next_payload(self) -> bytes:
        self._battery = max(self._battery - 0.001, 0.0)
        self._temperature = self.walk(self._temperature, 0.05, -30.0, 50.0)
        self._humidity = self.walk(self._humidity, 0.2, 5.0, 100.0)
        self._pressure = self.walk(self._pressure, 4.0, 95000.0, 106000.0)
        objects = [
            (OBJ_BATTERY, float(round(self._battery))),
            (OBJ_TEMPERATURE, round(self._temperature, 2)),
            (OBJ_HUMIDITY, round(self._humidity, 2)),
            (OBJ_PRESSURE, float(round(self._pressure))),
        ]
        packet_id = None
        if self.packet_ids:
            self._packet_id = (self._packet_id + 1) & 0xFF
            packet_id = self._packet_id
        plain = codec.encode(objects, packet_id=packet_id, trigger=self.trigger)
        self.sent_plain.append(plain)
        if self.key is None:
            return plain
        if self._plain_next:
            self._plain_next = False
            self.sent_plain.pop()  # a receiver holding the key must refuse it
            return plain
        sealed = crypto.encrypt(plain, self.address, self.key, self.counter)
        self.counter += 1
        if self._corrupt_next:
            self._corrupt_next = False
            self.sent_plain.pop()  # never a valid measurement
            return sealed[:-1] + bytes([sealed[-1] ^ 0x01])
        self.sent_sealed.append(sealed)
        return sealed

    def deliver(self, payload: bytes, rssi: int) -> None:
        self.bluez.advertise_service(self.address, SERVICE_UUID, payload, rssi=rssi)
