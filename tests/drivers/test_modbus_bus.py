"""One scheduler per bus: serialised transactions, silent gaps, idle times, dead devices."""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
from pathlib import Path

import pytest

from drivers.modbus import EmulatedDevice, ModbusRtuEmulator, ModbusTcpEmulator
from drivers.modbus.bus import Transaction
from drivers.modbus.driver import ModbusFamily
from drivers.modbus.options import BusSettings
from tests.drivers.test_modbus_driver import Collector, assert_served, make, start, stop_all, until

pytestmark = pytest.mark.integration

EPSILON_S = 1e-4  # loop timers never fire early by more than this


def test_dead_device_costs_only_its_timeout_and_the_healthy_period_holds() -> None:
    period = 0.4
    healthy = EmulatedDevice("sdm120", 1, seed=21)
    dead = EmulatedDevice("senseair_s8", 2, seed=22)
    dead.dead = True
    family = ModbusFamily()
    out = Collector()
    with ModbusRtuEmulator([healthy, dead], baud=19200) as emu:
        meter = make(family, "meter", emu.port, profile="sdm120", baud=19200, period_s=period)
        co2 = make(
            family, "co2", emu.port, profile="senseair_s8", baud=19200, unit_id=2,
            period_s=period, timeout_ms=50, retries=1,
        )  # fmt: skip
        ghost = make(family, "ghost", emu.port, profile="urm13", baud=19200, unit_id=9,
                     period_s=period, timeout_ms=50, retries=0)  # fmt: skip

        async def scenario() -> None:
            tasks = start([meter, co2, ghost], out)
            try:
                await until(lambda: len(out.of("meter")) >= 11, "eleven polls of the meter")
                state = co2.state()
                assert not state.available
                assert state.reason.startswith("no answer from unit 2 within ")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        assert_served(out.of("meter"), healthy)
    times = [batch[0].time for batch in out.of("meter")]
    intervals = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(intervals) == pytest.approx(period, rel=0.10)
    assert max(intervals) < 2 * period  # no tick of the healthy meter was lost
    counters = co2.state().counters
    assert counters["no_answer"] >= 3
    assert counters["retries"] >= counters["no_answer"]  # each poll asked twice ...
    assert counters["transactions"] <= 2 * counters["polls"]  # ... then waited for its next one
    assert out.of("co2") == out.of("ghost") == []


def _gaps(trace: list[Transaction]) -> list[tuple[Transaction, Transaction]]:
    return list(itertools.pairwise(trace))


def test_transactions_are_serialised_with_silent_intervals_and_device_idle_times() -> None:
    devices = [
        EmulatedDevice("sdm120", 1, seed=23),
        EmulatedDevice("senseair_s8", 2, seed=24),
        EmulatedDevice("urm13", 13, seed=25),
    ]
    family = ModbusFamily()
    with ModbusRtuEmulator(devices, baud=9600) as emu:
        bus = family.buses.acquire(BusSettings(emu.port, 9600, "N", 1))
        trace: list[Transaction] = []
        bus.trace = trace
        common = {"baud": 9600, "period_s": 0.25, "timeout_ms": 1000}  # no timeouts here
        drivers = [
            make(family, "meter", emu.port, profile="sdm120", **common),
            make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, **common),
            make(family, "dist", emu.port, profile="urm13", **common),
        ]

        async def scenario() -> None:
            tasks = start(drivers, Collector())
            try:
                await until(lambda: len(trace) >= 25, "25 transactions")
                async with bus.held():  # stop between transactions: none is cut short
                    await stop_all(tasks)
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
        family.buses.release(bus)
    assert bus.silent_interval_s == pytest.approx(3.5 * 10 / 9600)
    for before, after in _gaps(trace):
        assert after.started - before.ended >= bus.silent_interval_s - EPSILON_S  # t3.5, no overlap
    for unit, idle in ((1, 0.060), (2, bus.silent_interval_s)):
        mine = [t for t in trace if t.unit == unit]
        for before, after in _gaps(mine):
            assert after.started - before.ended >= idle - EPSILON_S
    urm13 = [t for t in trace if t.unit == 13]
    triggers, reads = urm13[0::2], urm13[1::2]
    assert [t.bytes_in for t in triggers] == [8] * len(triggers)  # write echo
    for trigger, read in zip(triggers, reads, strict=False):
        assert read.started - trigger.ended >= 0.100 - EPSILON_S  # the URM13 measures meanwhile
    assert all(t.answered for t in trace)


def test_sensors_on_one_port_share_the_bus_until_the_last_one_stops() -> None:
    family = ModbusFamily()
    out = Collector()
    devices = [EmulatedDevice("urm13", 13, seed=26), EmulatedDevice("senseair_s8", 2, seed=27)]
    with ModbusTcpEmulator(devices) as emu:
        dist = make(family, "dist", emu.port, profile="urm13", period_s=0.05)
        co2 = make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, period_s=0.05)

        async def scenario() -> None:
            first, second = start([dist, co2], out)
            try:
                await until(lambda: len(out.of("co2")) >= 1 and len(out.of("dist")) >= 1, "both")
                bus = family.buses.get(emu.port)
                assert bus is not None
                assert bus.users == 2
                await stop_all([first])
                assert family.buses.get(emu.port) is bus  # still held by the other sensor
                before = len(out.of("co2"))
                await until(lambda: len(out.of("co2")) >= before + 2, "readings after")
            finally:
                await stop_all([first, second])
            assert len(family.buses) == 0

        asyncio.run(scenario())


def test_a_sensor_asking_for_other_serial_settings_on_a_shared_port_is_refused() -> None:
    family = ModbusFamily()
    out = Collector()
    with ModbusRtuEmulator([EmulatedDevice("senseair_s8", 2, seed=28)], baud=9600) as emu:
        good = make(family, "co2", emu.port, profile="senseair_s8", unit_id=2, period_s=0.1)
        odd = make(family, "meter", emu.port, profile="sdm120", period_s=0.1)  # 2400 baud

        async def scenario() -> None:
            tasks = start([good, odd], out)
            try:
                await until(lambda: len(out.of("co2")) >= 2, "readings of the first sensor")
                assert odd.state().reason == (
                    f"bus {emu.port} is shared at {emu.port} at 9600 8N1, "
                    f"this sensor asks for {emu.port} at 2400 8N1"
                )
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())


def test_unplugged_adapter_is_reported_and_reopened_when_it_returns(tmp_path: Path) -> None:
    link = str(tmp_path / "ttyMODBUS")
    family = ModbusFamily()
    out = Collector()
    with ModbusRtuEmulator([EmulatedDevice("senseair_s8", 2, seed=29)], link=link) as emu:
        co2 = make(family, "co2", link, profile="senseair_s8", unit_id=2, period_s=0.05)

        async def scenario() -> None:
            tasks = start([co2], out)
            try:
                await until(lambda: len(out.batches) >= 2, "readings")
                emu.disconnect()
                await until(lambda: not co2.state().available, "the hang-up")
                emu.replug()
                before = len(out.batches)
                await until(lambda: len(out.batches) >= before + 2, "readings after replug")
                bus = family.buses.get(link)
                assert bus is not None
                assert bus.opens >= 2
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
    assert co2.state().counters["no_answer"] + co2.state().counters["link_down"] >= 1


def test_missing_port_is_reported_without_spinning(tmp_path: Path) -> None:
    family = ModbusFamily()
    port = str(tmp_path / "ttyNONE")
    co2 = make(family, "co2", port, profile="senseair_s8", period_s=0.05)

    async def scenario() -> None:
        tasks = start([co2], Collector())
        try:
            await until(lambda: co2.state().counters["link_down"] >= 2, "two failed polls")
            await asyncio.sleep(0.3)
        finally:
            await stop_all(tasks)

    asyncio.run(scenario())
    state = co2.state()
    assert state.reason == "stopped"
    assert state.counters["polls"] <= 12  # one attempt per period, no busy loop
    assert state.counters["transactions"] == 0


def test_a_cancellation_dropped_by_wait_for_is_raised_again() -> None:
    # pymodbus awaits replies with asyncio.wait_for, which on Python 3.11 returns the result
    # and drops a cancellation that arrives together with it; the link raises it again
    from drivers.modbus.link import _resume_cancellation

    async def request(reply: asyncio.Future[int]) -> int:
        value = await asyncio.wait_for(reply, 10)
        _resume_cancellation()
        return value

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(request(reply))
        await asyncio.sleep(0)  # the task now waits inside wait_for
        reply.set_result(7)
        task.cancel()  # in the same loop iteration as the reply
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(scenario())


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stopping_drivers_and_emulators_leaves_no_descriptor_open() -> None:
    before = _open_fds()
    family = ModbusFamily()
    out = Collector()
    devices = [EmulatedDevice("sdm120", 1, seed=41), EmulatedDevice("urm13", 13, seed=42)]
    with (
        ModbusRtuEmulator(devices[:1], baud=19200) as rtu,
        ModbusTcpEmulator(devices[1:]) as tcp,
    ):
        drivers = [
            make(family, "meter", rtu.port, profile="sdm120", baud=19200, period_s=0.05),
            make(family, "dist", tcp.port, profile="urm13", period_s=0.05),
        ]

        async def scenario() -> None:
            tasks = start(drivers, out)
            try:
                await until(lambda: len(out.of("meter")) >= 2 and len(out.of("dist")) >= 2, "both")
            finally:
                await stop_all(tasks)

        asyncio.run(scenario())
    assert _open_fds() == before
