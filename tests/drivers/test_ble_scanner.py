"""The shared BLE scanner and its registry, through real bleak on the mock BlueZ."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from drivers import OptionError
from drivers.ble import (
    BTHOME_UUID,
    RUUVI_COMPANY_ID,
    Advertisement,
    RepeatFilter,
    SharedScanner,
    active_scanner,
    attach,
    classify,
    parse_address,
    set_unknown_listener,
)
from drivers.ble.mockbluez import MockBlueZ
from drivers.ble.scanner import describe_failure, next_backoff

TAG_A = "C9:44:54:29:E3:8D"
TAG_B = "CB:B8:33:4C:88:4F"
STRANGER = "54:48:E6:8F:80:A5"
PHONE = "11:22:33:44:55:66"


class Recorder:
    """A listener that keeps what it was told."""

    def __init__(self) -> None:
        self.ads: list[Advertisement] = []
        self.states: list[tuple[bool, str]] = []

    def on_advertisement(self, adv: Advertisement) -> None:
        self.ads.append(adv)

    def on_scanner_state(self, scanning: bool, reason: str) -> None:
        self.states.append((scanning, reason))

    def payloads(self) -> list[bytes]:
        return [a.manufacturer_data[RUUVI_COMPANY_ID] for a in self.ads if a.manufacturer_data]


@pytest.fixture
def unknown() -> Iterator[list[tuple[str, str, int]]]:
    """Install an unknown-device listener for the test and put the previous one back."""
    reports: list[tuple[str, str, int]] = []
    previous = set_unknown_listener(
        lambda address, kind, rssi: reports.append((address, kind, rssi))
    )
    yield reports
    set_unknown_listener(previous)


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for {what}") from None


def _scanning(recorder: Recorder) -> bool:
    return bool(recorder.states) and recorder.states[-1][0]


@pytest.mark.integration
def test_one_scanner_dispatches_by_address_and_reports_unknown_sensors_once(
    unknown: list[tuple[str, str, int]],
) -> None:
    first, second = Recorder(), Recorder()

    async def scenario(bluez: MockBlueZ) -> None:
        assert active_scanner() is None
        async with attach(TAG_A, first) as shared_a, attach(TAG_B.lower(), second) as shared_b:
            assert shared_a is shared_b is active_scanner()  # one scanner for every sensor
            await _until(lambda: _scanning(first) and _scanning(second), "the scan to start")
            for address in (TAG_A, TAG_B, STRANGER, PHONE):
                bluez.add_device(address, "device")
            for n in range(3):
                bluez.advertise_manufacturer(TAG_A, RUUVI_COMPANY_ID, bytes([5, n]), rssi=-60)
                bluez.advertise_manufacturer(TAG_B, RUUVI_COMPANY_ID, bytes([6, n]), rssi=-70)
                bluez.advertise_service(STRANGER, 0xFCD2, bytes([0x40, n]), rssi=-80)
                bluez.advertise_manufacturer(PHONE, 0x004C, bytes([n]), rssi=-50)
            await _until(lambda: len(second.payloads()) == 3, "the last advertisement of B")
            await _until(lambda: bool(unknown), "the unknown report")
        assert active_scanner() is None  # the last listener gone, the scanner is stopped

    with MockBlueZ() as bluez:
        asyncio.run(scenario(bluez))

    assert first.payloads() == [b"\x05\x00", b"\x05\x01", b"\x05\x02"]
    assert second.payloads() == [b"\x06\x00", b"\x06\x01", b"\x06\x02"]
    assert {a.address for a in first.ads} == {TAG_A}
    # the BTHome-looking stranger is reported once, the phone (company 0x004C) never
    assert unknown == [(STRANGER, "bthome", -80)]


@pytest.mark.integration
def test_scanner_without_bluez_reports_why_and_retries_until_it_runs() -> None:
    listener = Recorder()

    async def scenario(bluez: MockBlueZ) -> None:
        async with attach(TAG_A, listener):
            await _until(lambda: len(listener.states) >= 2, "a failed start")
            assert listener.states[0] == (False, "not started")
            assert listener.states[1][1] == (
                "BlueZ is not running (no org.bluez on the system bus); retrying in 0.5 s"
            )
            bluez.start_bluez()
            await _until(lambda: _scanning(listener), "scanning after bluetoothd starts")
            bluez.add_device(TAG_A, "Ruuvi E38D")
            bluez.advertise_manufacturer(TAG_A, RUUVI_COMPANY_ID, b"\x05\x09")
            await _until(lambda: bool(listener.payloads()), "an advertisement")

    with MockBlueZ() as bluez:
        bluez.stop_bluez()
        asyncio.run(scenario(bluez))
    assert listener.payloads() == [b"\x05\x09"]


@pytest.mark.integration
def test_scanner_waits_for_a_missing_adapter_to_be_plugged_in() -> None:
    listener = Recorder()

    async def scenario(bluez: MockBlueZ) -> None:
        async with attach(TAG_A, listener):
            await _until(lambda: len(listener.states) >= 2, "a failed start")
            assert listener.states[1][1].startswith("Bluetooth adapter hci0 not found; retrying")
            bluez.add_adapter("hci0")
            await _until(lambda: _scanning(listener), "scanning after the adapter appears")

    with MockBlueZ(adapter=None) as bluez:
        asyncio.run(scenario(bluez))


@pytest.mark.integration
def test_a_scan_that_hears_nothing_is_restarted_and_keeps_delivering() -> None:
    listener = Recorder()

    async def scenario(bluez: MockBlueZ) -> SharedScanner:
        scanner = SharedScanner("hci0", idle_restart_s=0.3)
        scanner.add(TAG_A, listener)
        scanner.start()
        try:
            await _until(lambda: scanner.restarts >= 1, "an idle restart")
            await _until(lambda: _scanning(listener), "scanning again")
            bluez.add_device(TAG_A, "Ruuvi E38D")
            bluez.advertise_manufacturer(TAG_A, RUUVI_COMPANY_ID, b"\x05\x01")
            await _until(lambda: bool(listener.payloads()), "an advertisement after the restart")
        finally:
            await scanner.close()
        return scanner

    with MockBlueZ() as bluez:
        scanner = asyncio.run(scenario(bluez))
    assert (False, "no advertisement for 0.3 s; restarting the scan") in listener.states
    assert scanner.reason == "stopped"
    assert not scanner.scanning


def test_unknown_listener_is_replaced_and_handed_back() -> None:
    def first(address: str, kind: str, rssi: int) -> None: ...

    def second(address: str, kind: str, rssi: int) -> None: ...

    original = set_unknown_listener(first)
    try:
        assert set_unknown_listener(second) is first
        assert set_unknown_listener(None) is second
    finally:
        set_unknown_listener(original)


def test_advertisements_are_classified_by_the_ids_the_families_use() -> None:
    def adv(manufacturer: dict[int, bytes], service: dict[str, bytes]) -> Advertisement:
        return Advertisement(TAG_A, -70, manufacturer, service)

    assert classify(adv({RUUVI_COMPANY_ID: b"\x05"}, {})) == "ruuvi"
    assert classify(adv({}, {BTHOME_UUID: b"\x40"})) == "bthome"
    assert classify(adv({0x004C: b"\x02"}, {"0000feaa-0000-1000-8000-00805f9b34fb": b""})) is None


def test_failures_to_start_read_as_reasons_a_technician_can_act_on() -> None:
    assert describe_failure(FileNotFoundError(2, "No such file"), "hci0").startswith(
        "no D-Bus system bus"
    )
    assert describe_failure(RuntimeError("adapter 'hci1' not found"), "hci1") == (
        "Bluetooth adapter hci1 not found"
    )
    assert next_backoff(0.5) == 1.0
    assert next_backoff(20.0) == 30.0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("aa:bb:cc:dd:ee:ff", "AA:BB:CC:DD:EE:FF"),
        ("AA-BB-CC-DD-EE-FF", "AA:BB:CC:DD:EE:FF"),
        (" aabbccddeeff ", "AA:BB:CC:DD:EE:FF"),
    ],
)
def test_addresses_are_normalised_to_the_form_bluez_uses(given: str, expected: str) -> None:
    assert parse_address(given) == expected


@pytest.mark.parametrize("given", ["AA:BB:CC:DD:EE", "GG:BB:CC:DD:EE:FF", "AABBCCDDEEF", 42])
def test_malformed_addresses_are_refused_naming_the_key(given: object) -> None:
    with pytest.raises(OptionError) as caught:
        parse_address(given)
    assert caught.value.key == "address"


def test_repeats_are_told_by_sequence_or_else_by_identical_bytes_within_the_window() -> None:
    by_sequence = RepeatFilter()
    assert not by_sequence.is_repeat(7, b"a", 0.0)
    assert by_sequence.is_repeat(7, b"b", 1.0)  # same sequence: the same measurement
    assert not by_sequence.is_repeat(8, b"b", 2.0)
    by_bytes = RepeatFilter(window_s=60.0)
    assert not by_bytes.is_repeat(None, b"a", 0.0)
    assert by_bytes.is_repeat(None, b"a", 59.0)
    assert not by_bytes.is_repeat(None, b"b", 59.5)
    assert not by_bytes.is_repeat(None, b"b", 120.0)  # a steady value still reports
