"""The mock BlueZ harness, observed through real bleak 3.1 exactly as the drivers use it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from drivers.ble import BTHOME_UUID, RUUVI_COMPANY_ID
from drivers.ble.mockbluez import ENV_VAR, MockBlueZ, MockBlueZError, full_uuid

pytestmark = pytest.mark.integration

TAG = "C9:44:54:29:E3:8D"
Seen = tuple[str, dict[int, bytes], dict[str, bytes], int]


@pytest.fixture(scope="module")
def bluez() -> Iterator[MockBlueZ]:
    with MockBlueZ() as running:
        yield running


async def _until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


def _scanner(seen: list[Seen]) -> BleakScanner:
    def detected(device: BLEDevice, adv: AdvertisementData) -> None:
        seen.append((device.address, adv.manufacturer_data, adv.service_data, adv.rssi))

    return BleakScanner(detected, scanning_mode="active", bluez={"adapter": "hci0"})


def test_bleak_receives_manufacturer_and_service_data_with_the_types_bluez_uses(
    bluez: MockBlueZ,
) -> None:
    seen: list[Seen] = []

    async def scenario() -> None:
        async with _scanner(seen):
            bluez.add_device(TAG, "Ruuvi E38D", rssi=-80)
            bluez.advertise_manufacturer(TAG, RUUVI_COMPANY_ID, b"\x05\x01", rssi=-61)
            bluez.advertise_manufacturer(TAG, RUUVI_COMPANY_ID, b"\x05\x02", rssi=-62)
            bluez.advertise_service(TAG, 0xFCD2, b"\x40\x02\xc4\x09")
            await _until(lambda: len(seen) >= 4, "four callbacks")
        bluez.remove_device(TAG)

    asyncio.run(scenario())
    assert seen[0] == (TAG, {}, {}, -80)  # the device appeared (InterfacesAdded)
    assert seen[1] == (TAG, {RUUVI_COMPANY_ID: b"\x05\x01"}, {}, -61)
    assert seen[2] == (TAG, {RUUVI_COMPANY_ID: b"\x05\x02"}, {}, -62)
    # BlueZ keeps the last value of every key: manufacturer data stays beside service data
    assert seen[3] == (
        TAG,
        {RUUVI_COMPANY_ID: b"\x05\x02"},
        {BTHOME_UUID: b"\x40\x02\xc4\x09"},
        -62,
    )


def test_a_removed_device_no_longer_advertises_and_can_come_back(bluez: MockBlueZ) -> None:
    seen: list[Seen] = []

    async def scenario() -> None:
        async with _scanner(seen):
            bluez.add_device(TAG, "Ruuvi E38D")
            bluez.remove_device(TAG)
            assert not bluez.has_device(TAG)
            with pytest.raises(MockBlueZError, match="add_device"):
                bluez.advertise_manufacturer(TAG, RUUVI_COMPANY_ID, b"\x05")
            bluez.add_device(TAG, "Ruuvi E38D")
            bluez.advertise_manufacturer(TAG, RUUVI_COMPANY_ID, b"\x05\x07")
            await _until(lambda: any(s[1] for s in seen), "the advertisement after re-adding")
        bluez.remove_device(TAG)

    asyncio.run(scenario())
    assert seen[-1][1] == {RUUVI_COMPANY_ID: b"\x05\x07"}


def test_bleak_reports_a_missing_adapter_and_a_missing_bluez() -> None:
    async def start_scan() -> None:
        async with _scanner([]):
            pass

    with MockBlueZ(adapter=None) as bluez:
        with pytest.raises(BleakError, match="adapter 'hci0' not found"):
            asyncio.run(start_scan())
        bluez.stop_bluez()
        with pytest.raises(BleakError, match="ServiceUnknown"):
            asyncio.run(start_scan())


def test_stop_ends_both_processes_and_restores_the_environment() -> None:
    before = os.environ.get(ENV_VAR)
    bluez = MockBlueZ()
    with bluez:
        address = bluez.bus_address
        assert os.environ[ENV_VAR] == address
        assert bluez.environ() == {ENV_VAR: address}
        socket_path = address.split("path=")[1].split(",")[0]
        assert os.path.exists(socket_path)
    assert os.environ.get(ENV_VAR) == before
    assert not os.path.exists(socket_path)  # the private directory is gone
    # the leak fixture checks that no dbus-daemon or mock bluetoothd is left running


def test_uuids_are_written_the_way_bluez_and_bleak_write_them() -> None:
    assert full_uuid(0xFCD2) == BTHOME_UUID
    assert full_uuid("FCD2") == BTHOME_UUID
    assert full_uuid(BTHOME_UUID.upper()) == BTHOME_UUID
