"""The Modbus driver against emulated devices over real TCP sockets and a paced pty."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from drivers import Driver, Reading
from drivers.modbus import EmulatedDevice, ModbusRtuEmulator, ModbusTcpEmulator
from drivers.modbus.driver import ModbusFamily

pytestmark = pytest.mark.integration

POLL_S = 0.01


class Collector:
    """The emit callback of one or more drivers: every batch, in order."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.batches.append(list(batch))

    def of(self, sensor: str) -> list[list[Reading]]:
        return [b for b in self.batches if b[0].sensor == sensor]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after about `timeout_s`."""
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


def make(family: ModbusFamily, sensor: str, port: str, **settings: Any) -> Driver:
    table = {"driver": "modbus", "port": port, **settings}
    return family.create(sensor, family.parse_options(sensor, table))


async def stop_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def start(drivers: Sequence[Driver], emit: Collector) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(d.run(emit), name=f"modbus-{d.sensor_id}") for d in drivers]


def assert_served(batches: list[list[Reading]], device: EmulatedDevice) -> None:
    """Every reading is a value the device served, exactly as a reader decodes it."""
    served: dict[str, set[float]] = {}
    for values in device.served_values():
        for quantity, value in values.items():
            served.setdefault(quantity, set()).add(value)
    quantities = {f.quantity for f in device.profile.fields if f.publish}
    for batch in batches:
        assert {r.quantity for r in batch} == quantities
        assert len({r.time for r in batch}) == 1  # one poll, one time stamp
        for reading in batch:
            assert reading.value in served[reading.quantity], reading


# -- every shipped profile, over TCP and over the paced RTU line ----------------------------------


def test_tcp_bus_reads_every_shipped_profile_as_the_devices_served_it() -> None:
    devices = [
        EmulatedDevice("sdm630", 1, seed=1),
        EmulatedDevice("senseair_s8", 2, seed=2),
        EmulatedDevice("urm13", 13, seed=3),
        EmulatedDevice("sdm120", 4, seed=4),
    ]
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator(devices) as emu:
        drivers = [
            make(family, "meter3", emu.port, profile="sdm630", period_s=0.1),
            make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, period_s=0.1),
            make(family, "dist", emu.port, profile="urm13", period_s=0.1),
            make(family, "meter1", emu.port, profile="sdm120", unit_id=4, period_s=0.1),
        ]

        async def scenario() -> None:
            tasks = start(drivers, out)
            try:
                await until(lambda: all(len(out.of(d.sensor_id)) >= 3 for d in drivers), "polls")
                assert len(family.buses) == 1  # four sensors, one bus
                assert all(d.state().available for d in drivers)
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        for driver, device in zip(drivers, devices, strict=True):
            assert_served(out.of(driver.sensor_id), device)
        assert emu.device(13).writes[:1] == [(8, 12)]  # the URM13 trigger
    assert len(family.buses) == 0  # the last driver closed it
    meter = drivers[0].state()
    assert (meter.available, meter.reason) == (False, "stopped")
    counters = meter.counters  # coalesced: two requests per poll (the last one was cut short)
    assert 2 * counters["readings"] <= counters["transactions"] <= 2 * counters["polls"]
    assert counters["exceptions"] == counters["timeouts"] == 0


def test_rtu_bus_on_a_paced_pty_reads_every_shipped_profile() -> None:
    devices = [
        EmulatedDevice("sdm120", 1, seed=5),
        EmulatedDevice("senseair_s8", 2, seed=6),
        EmulatedDevice("urm13", 13, seed=7),
    ]
    family = ModbusFamily()
    out = Collector()
    with ModbusRtuEmulator(devices, baud=19200) as emu:
        common = {"baud": 19200, "period_s": 0.3}
        drivers = [
            make(family, "meter", emu.port, profile="sdm120", **common),
            make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, **common),
            make(family, "dist", emu.port, profile="urm13", **common),
        ]

        async def scenario() -> None:
            tasks = start(drivers, out)
            try:
                await until(lambda: all(len(out.of(d.sensor_id)) >= 2 for d in drivers), "polls")
                bus = family.buses.get(emu.port)
                assert bus is not None
                async with bus.held():  # stop between transactions: the counts are final
                    await stop_all(tasks)
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        for driver, device in zip(drivers, devices, strict=True):
            assert_served(out.of(driver.sensor_id), device)
        # what the bus counted is what crossed the emulated wire
        states = [d.state().counters for d in drivers]
        assert sum(s["bytes_out"] for s in states) == emu.bytes_to_devices
        assert sum(s["bytes_in"] for s in states) == emu.bytes_to_host


# -- faults ------------------------------------------------------------------------------------


def test_exception_on_one_register_group_loses_only_that_group() -> None:
    meter = EmulatedDevice("sdm120", 1, seed=8)
    meter.add_exception(2, function=4, first=0x46, last=0x4B)  # frequency and energy refused
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([meter]) as emu:
        driver = make(family, "meter", emu.port, profile="sdm120", period_s=0.1)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: len(out.batches) >= 2, "polls")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
    quantities = {r.quantity for batch in out.batches for r in batch}
    assert quantities == {
        "voltage", "current", "active_power", "apparent_power", "reactive_power", "power_factor"
    }  # fmt: skip
    state = driver.state()
    assert state.counters["exceptions"] >= 2
    assert state.counters["retries"] == 0  # illegal address is not worth another try


def test_exception_reason_names_the_group_and_the_code() -> None:
    meter = EmulatedDevice("sdm120", 1, seed=8)
    meter.add_exception(2, function=4, first=0x46, last=0x4B)
    family = ModbusFamily()
    with ModbusTcpEmulator([meter]) as emu:
        driver = make(family, "meter", emu.port, profile="sdm120", period_s=0.1)

        async def scenario() -> None:
            tasks = start([driver], Collector())
            try:
                await until(lambda: driver.state().counters["exceptions"] >= 1, "the exception")
                state = driver.state()
                assert state.available  # the other group was read
                assert state.reason == (
                    "function 4 registers 70-75: exception 02 (illegal data address)"
                )
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())


def test_a_value_the_meter_reports_as_nan_is_left_out_and_counted() -> None:
    meter = EmulatedDevice("sdm120", 1, seed=15)
    meter.not_a_number = {"power_factor"}
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([meter]) as emu:
        driver = make(family, "meter", emu.port, profile="sdm120", period_s=0.1)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: len(out.batches) >= 2, "readings")
                assert (driver.state().available, driver.state().reason) == (
                    True,
                    "not a number: power_factor",
                )
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
    assert all(len(batch) == 8 for batch in out.batches)
    assert "power_factor" not in {r.quantity for batch in out.batches for r in batch}
    assert driver.state().counters["invalid_values"] >= 2


def test_busy_device_is_asked_again_and_read() -> None:
    meter = EmulatedDevice("sdm120", 1, seed=9)
    meter.add_exception(6, times=1)  # "server device busy", once
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([meter]) as emu:
        driver = make(family, "meter", emu.port, profile="sdm120", period_s=0.1)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: len(out.batches) >= 1, "a reading")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        assert_served(out.batches, meter)
    counters = driver.state().counters
    assert (counters["exceptions"], counters["retries"]) == (1, 1)
    assert len(out.batches[0]) == 9  # nothing lost to the busy answer


def test_senseair_warmup_and_status_errors_are_counted_never_published() -> None:
    sensor = EmulatedDevice("senseair_s8", 2, seed=10, warmup_reads=2)
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([sensor]) as emu:
        driver = make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, period_s=0.05)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: driver.state().counters["status_rejected"] >= 1, "warm-up")
                assert driver.state().reason == (
                    "no reading: status meter_status 0x0020 (out of range)"
                )
                assert not driver.state().available
                await until(lambda: len(out.batches) >= 2, "readings after warm-up")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        assert_served(out.batches, sensor)
    assert driver.state().counters["status_rejected"] == 2
    assert all(r.value >= 400 for batch in out.batches for r in batch)  # no 0 ppm published


def test_warmup_window_of_the_config_drops_early_readings() -> None:
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([EmulatedDevice("urm13", 13, seed=11)]) as emu:
        driver = make(family, "dist", emu.port, profile="urm13", period_s=0.05, warmup_s=0.3)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: driver.state().counters["warmup"] >= 1, "warm-up")
                assert out.batches == []
                assert driver.state().reason == "warming up"
                await until(lambda: len(out.batches) >= 1, "a reading after warm-up")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())


def test_slow_device_within_its_timeout_is_still_read() -> None:
    sensor = EmulatedDevice("senseair_s8", 2, seed=12)
    sensor.delay_s = 0.08
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([sensor]) as emu:
        driver = make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, period_s=0.1)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: len(out.batches) >= 3, "readings")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        assert_served(out.batches, sensor)
    assert driver.state().counters["timeouts"] == 0


def test_word_order_override_reads_a_meter_set_to_reversed_order() -> None:
    meter = EmulatedDevice("sdm630", 1, seed=13)
    meter.word_order = "CDAB"
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([meter]) as emu:
        plain = make(family, "plain", emu.port, profile="sdm630", period_s=0.1)
        swapped = make(
            family, "swapped", emu.port, profile="sdm630", word_order="CDAB", period_s=0.1
        )

        async def scenario() -> None:
            tasks = start([plain, swapped], out)
            try:
                await until(lambda: len(out.of("swapped")) >= 2, "readings")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        assert_served(out.of("swapped"), meter)
    volts = [r.value for b in out.of("plain") for r in b if r.quantity == "voltage_l1"]
    assert volts
    assert not any(200 < v < 260 for v in volts)  # ABCD on a CDAB meter reads nonsense


def test_tcp_connection_dropped_by_the_gateway_is_reopened() -> None:
    family = ModbusFamily()
    out = Collector()
    with ModbusTcpEmulator([EmulatedDevice("urm13", 13, seed=14)]) as emu:
        driver = make(family, "dist", emu.port, profile="urm13", period_s=0.05)

        async def scenario() -> None:
            tasks = start([driver], out)
            try:
                await until(lambda: len(out.batches) >= 2, "readings")
                emu.disconnect()
                before = len(out.batches)
                await until(lambda: len(out.batches) >= before + 3, "readings after the drop")
                bus = family.buses.get(emu.port)
                assert bus is not None
                assert bus.opens == 2
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
