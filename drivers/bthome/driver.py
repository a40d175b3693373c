"""Bind the BTHome v2 codec (and its AES-CCM decryption) to the gateway's shared BLE scanner.

A `bthome` sensor is one device matched by its Bluetooth address, read from
the service data of UUID 0xFCD2. With a `key` in the config the device must
encrypt: each packet's MIC is checked with crypto.decrypt (a bad MIC is
rejected and counted), its encryption counter must increase (a replayed or
older counter is rejected and counted; a counter that drops below 100 after
being higher is taken as the device restarting, as bthome-ble does), and a
plaintext packet from such a device is rejected. Without a key, encrypted
packets are counted and rejected with a reason saying a key is needed.
Repeats of one measurement (same packet id; without a packet id, the same
bytes) are dropped and counted. Trigger-based devices (device info bit 2)
are not declared unavailable for being silent.

Trust: the config table is unverified until `parse_options` accepts it. A
plaintext packet is believed as sent; an encrypted one only once its MIC
verifies under the configured key and its counter is new.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import Decoded, Driver, OptionError
from drivers.ble.repeats import RepeatFilter
from drivers.ble.scanner import BTHOME_UUID, Advertisement
from drivers.ble.sensor import (
    BleSensorDriver,
    Verdict,
    check_known,
    ignored,
    new,
    parse_address,
    parse_seconds,
    rejected,
    repeat,
)
from drivers.bthome import codec, crypto

#: a counter below this after a higher one is a device restart, not a replay (bthome-ble's rule)
RESTART_COUNTER_BELOW = 100
_COUNTERS = (
    "advertisements",
    "measurements",
    "duplicates",
    "invalid",
    "bad_mic",
    "replays",
    "encrypted_without_key",
    "unencrypted_rejected",
    "foreign",
)


@dataclass(frozen=True, slots=True)
class BTHomeOptions:
    """Validated settings of one BTHome device (see README.md, "Settings")."""

    address: str
    key: bytes | None = None
    silence_timeout_s: float = 300.0


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> BTHomeOptions:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    check_known("bthome", sensor_id, table, {"driver", "address", "key", "silence_timeout_s"})
    if "address" not in table:
        raise OptionError("address", "missing: the device's Bluetooth address, AA:BB:CC:DD:EE:FF")
    default = BTHomeOptions(address="").silence_timeout_s
    return BTHomeOptions(
        address=parse_address(table["address"]),
        key=_key(table["key"]) if "key" in table else None,
        silence_timeout_s=parse_seconds(
            "silence_timeout_s", table.get("silence_timeout_s", default), 1.0, 86400.0
        ),
    )


def _key(value: object) -> bytes:
    if not isinstance(value, str):
        raise OptionError("key", f"must be a string of 32 hex digits, got {type(value).__name__}")
    try:
        return crypto.parse_key(value)
    except codec.BTHomeError as exc:
        raise OptionError("key", f"{exc} (the device's bind key)") from None


class BTHomePayloads:
    """The family's judgement of one device's advertisements, with counters."""

    def __init__(self, address: str, key: bytes | None) -> None:
        self._address = address
        self._key = key
        self._repeats = RepeatFilter()
        self._counter: int | None = None  # of the last accepted encrypted packet
        self._sealed = b""  # the last accepted encrypted packet, as received
        self._irregular = False
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    def judge(self, adv: Advertisement) -> Verdict:
        data = adv.service_data.get(BTHOME_UUID)
        if data is None:
            self._counts["foreign"] += 1  # e.g. a scan response, or another service's data
            return ignored()
        self._counts["advertisements"] += 1
        plain = self._plaintext(data)
        if isinstance(plain, Verdict):
            return plain
        try:
            records = codec.decode(plain)
            packet = codec.packet_id(plain)
            self._irregular = codec.is_trigger_based(plain)
        except codec.BTHomeError as exc:
            return self._reject("invalid", f"invalid BTHome packet: {exc}")
        if self._repeats.is_repeat(packet, plain, time.monotonic()):
            self._counts["duplicates"] += 1
            return repeat(irregular=self._irregular)
        self._counts["measurements"] += 1
        return new(records, irregular=self._irregular)

    def _plaintext(self, data: bytes) -> bytes | Verdict:
        """The packet to decode, or the verdict on one that is not to be decoded."""
        if not data:
            return self._reject("invalid", "invalid BTHome packet: empty service data")
        if data[0] & codec.INFO_ENCRYPTED:
            if data == self._sealed:  # BlueZ handing out the last packet again
                self._counts["duplicates"] += 1
                return repeat(irregular=self._irregular)
            return self._open(data)
        if self._key is not None:
            return self._reject(
                "unencrypted_rejected", "unencrypted packet from a device configured with a key"
            )
        return data

    def _open(self, data: bytes) -> bytes | Verdict:
        """The plaintext of an encrypted packet, or the verdict rejecting it."""
        if self._key is None:
            return self._reject(
                "encrypted_without_key", "encrypted packet but no key is configured for it"
            )
        try:
            counter = crypto.counter_of(data)
            plain = crypto.decrypt(data, self._address, self._key)
        except crypto.BTHomeBadMic:
            return self._reject("bad_mic", "bad MIC: wrong key, or a forged or corrupted packet")
        except codec.BTHomeError as exc:
            return self._reject("invalid", f"invalid encrypted BTHome packet: {exc}")
        if not self._counter_is_new(counter):
            return self._reject(
                "replays", f"replayed encryption counter {counter} (last {self._counter})"
            )
        self._counter, self._sealed = counter, bytes(data)
        return plain

    def _counter_is_new(self, counter: int) -> bool:
        last = self._counter
        if last is None or counter > last:
            return True
        return counter < RESTART_COUNTER_BELOW <= last

    def _reject(self, counter: str, reason: str) -> Verdict:
        self._counts[counter] += 1
        return rejected(reason)


class BTHomeDriver(BleSensorDriver):
    """One BTHome device on the shared scanner; `run` returns only when cancelled."""

    def __init__(self, sensor_id: str, options: BTHomeOptions) -> None:
        payloads = BTHomePayloads(options.address, options.key)
        super().__init__(sensor_id, options.address, options.silence_timeout_s, payloads)
        self.options = options


def payload_of(data: bytes) -> bytes:
    """The service data in `data`: `data` itself when it starts with a BTHome v2 device
    info byte, else cut out of a whole advertisement (whose first byte, an AD length,
    cannot be 0x40-0x5F in a 31-byte legacy advertisement)."""
    if data and data[0] >> 5 == codec.VERSION:
        return data
    try:
        return codec.from_advertisement(data)
    except codec.BTHomeError:
        codec.decode(data)  # raises the precise reason for what was given
        raise


def decode(data: bytes, params: Mapping[str, str]) -> Decoded:
    """One packet for `citygate decode`: service data after the UUID (or a whole
    advertisement holding it); params "mac" and "key" decrypt an encrypted packet."""
    payload = payload_of(data)
    if payload[0] & codec.INFO_ENCRYPTED:
        if "mac" not in params or "key" not in params:
            raise codec.BTHomeEncrypted(
                "encrypted BTHome packet: --mac and --key are needed to decrypt it"
            )
        payload = crypto.decrypt(payload, params["mac"], crypto.parse_key(params["key"]))
    records = codec.decode(payload)
    if records:
        return Decoded(records)
    if codec.packet_id(payload) is not None:
        return Decoded([], "packet id only: no measurement in this packet")
    return Decoded([], "no measurement in this packet")


class BTHomeFamily:
    """The registry's view of the family: option parsing, construction, one-packet decoding."""

    name = "bthome"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> BTHomeOptions:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, BTHomeOptions):
            raise TypeError(f"expected BTHomeOptions, got {type(options).__name__}")
        return BTHomeDriver(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        return decode(data, params)
