"""Bind the Ruuvi codec to the gateway's shared BLE scanner.

A `ruuvi` sensor is one RuuviTag (data format 5) or Ruuvi Air (format 6)
matched by its Bluetooth address. Each advertisement's manufacturer data
(company 0x0499) is decoded; an advertisement repeating the measurement
sequence of the last one is dropped and counted (tags send every measurement
several times, and BlueZ re-delivers the last payload on every RSSI change);
fields holding the format's "not available" code are left out by the codec
and counted here as sentinels. Availability and silence are handled by
`drivers.ble.sensor.BleSensorDriver`.

Trust: the config table is unverified until `parse_options` accepts it;
advertisements are unverified radio data (a Ruuvi payload has no checksum or
signature: whoever sends with the configured address is believed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import Decoded, Driver, OptionError
from drivers.ble.repeats import RepeatFilter
from drivers.ble.scanner import Advertisement
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
from drivers.ruuvi import codec

#: measurement fields per data format, to count the ones sent as "not available"
FIELDS_PER_FORMAT = {codec.DF5: 9, codec.DF6: 8}


@dataclass(frozen=True, slots=True)
class RuuviOptions:
    """Validated settings of one Ruuvi sensor (see README.md, "Settings")."""

    address: str
    silence_timeout_s: float = 60.0


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> RuuviOptions:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    check_known("ruuvi", sensor_id, table, {"driver", "address", "silence_timeout_s"})
    if "address" not in table:
        raise OptionError("address", "missing: the tag's Bluetooth address, AA:BB:CC:DD:EE:FF")
    default = RuuviOptions(address="").silence_timeout_s
    return RuuviOptions(
        address=parse_address(table["address"]),
        silence_timeout_s=parse_seconds(
            "silence_timeout_s", table.get("silence_timeout_s", default), 1.0, 86400.0
        ),
    )


class RuuviPayloads:
    """The family's judgement of one tag's advertisements, with counters."""

    def __init__(self) -> None:
        self._repeats = RepeatFilter()
        self._counts = dict.fromkeys(
            ("advertisements", "measurements", "duplicates", "invalid", "sentinels", "foreign"), 0
        )

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    def judge(self, adv: Advertisement) -> Verdict:
        data = adv.manufacturer_data.get(codec.COMPANY_ID)
        if data is None:
            self._counts["foreign"] += 1  # e.g. the scan response, with only a name
            return ignored()
        self._counts["advertisements"] += 1
        try:
            fmt = codec.data_format(data)
            sequence = codec.measurement_sequence(data)
            records = codec.decode(data)
        except codec.RuuviError as exc:
            self._counts["invalid"] += 1
            return rejected(f"invalid Ruuvi payload: {exc}")
        if self._repeats.is_repeat(sequence, data, time.monotonic()):
            self._counts["duplicates"] += 1
            return repeat()
        self._counts["measurements"] += 1
        self._counts["sentinels"] += max(FIELDS_PER_FORMAT[fmt] - len(records), 0)
        return new(records)


class RuuviDriver(BleSensorDriver):
    """One Ruuvi device on the shared scanner; `run` returns only when cancelled."""

    def __init__(self, sensor_id: str, options: RuuviOptions) -> None:
        super().__init__(sensor_id, options.address, options.silence_timeout_s, RuuviPayloads())
        self.options = options


def payload_of(data: bytes) -> bytes:
    """The Ruuvi payload in `data`: `data` itself, or cut out of a whole advertisement."""
    try:
        codec.data_format(data)
    except codec.RuuviError as exc:
        try:
            return codec.from_advertisement(data)
        except codec.RuuviError:
            raise exc from None
    return data


def decode(data: bytes) -> Decoded:
    """One payload for `citygate decode`: manufacturer data after the company id (or a whole
    advertisement holding it)."""
    payload = payload_of(data)
    records = codec.decode(payload)
    if not records:
        return Decoded([], "every field holds its 'not available' code")
    return Decoded(records)


class RuuviFamily:
    """The registry's view of the family: option parsing, construction, one-payload decoding."""

    name = "ruuvi"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> RuuviOptions:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, RuuviOptions):
            raise TypeError(f"expected RuuviOptions, got {type(options).__name__}")
        return RuuviDriver(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        return decode(data)
