"""End to end: emulated Modbus devices -> real `citygate run` -> mosquitto -> verified readings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.modbus import EmulatedDevice, ModbusRtuEmulator, ModbusTcpEmulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, capture, new_capture, write_config

pytestmark = pytest.mark.integration


async def _until(predicate: object, limit_s: float, what: str) -> None:
    assert callable(predicate)
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


def test_rtu_and_tcp_devices_reach_the_verifier_as_signed_readings(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    meter = EmulatedDevice("sdm120", 1, seed=31)
    co2 = EmulatedDevice("senseair_s8", 2, seed=32, warmup_reads=1)
    distance = EmulatedDevice("urm13", 13, seed=33)
    out = new_capture(lab, ["gw-a"])

    def sensors_seen() -> set[str]:
        return {sensor for sensor, *_ in out.readings()}

    async def scenario(rtu: ModbusRtuEmulator, tcp: ModbusTcpEmulator) -> None:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        sensors = {
            "meter_1": {"driver": "modbus", "port": rtu.port, "profile": "sdm120",
                        "baud": 19200, "period_s": 0.3},
            "co2_1": {"driver": "modbus", "port": rtu.port, "profile": "senseair_s8",
                      "baud": 19200, "unit_id": 2, "period_s": 0.3},
            "bin_1": {"driver": "modbus", "port": tcp.port, "profile": "urm13", "period_s": 0.3},
        }  # fmt: skip
        config = write_config(tmp_path, lab, broker.port, sensors)
        agent = AgentProcess(config, tmp_path / "agent.log")
        await agent.start()
        try:
            await _until(
                lambda: (
                    sensors_seen() == {"meter_1", "co2_1", "bin_1"} and len(out.readings()) >= 40
                ),
                30,
                "readings of all three sensors at the verifier",
            )
        finally:
            assert await agent.stop() == 0
            stop.set()
            await watcher

    with (
        ModbusRtuEmulator([meter, co2], baud=19200) as rtu,
        ModbusTcpEmulator([distance]) as tcp,
    ):
        asyncio.run(scenario(rtu, tcp))
        served = {
            "meter_1": meter.served_values(),
            "co2_1": co2.served_values(),
            "bin_1": distance.served_values(),
        }
    assert out.failures == []
    for sensor, quantity, _time, value in out.readings():
        assert any(values.get(quantity) == pytest.approx(value) for values in served[sensor]), (
            sensor,
            quantity,
            value,
        )
    quantities = {(sensor, quantity) for sensor, quantity, *_ in out.readings()}
    assert ("meter_1", "energy_import") in quantities
    assert ("co2_1", "co2") in quantities
    assert ("bin_1", "distance") in quantities
    co2_values = [v for s, q, _t, v in out.readings() if (s, q) == ("co2_1", "co2")]
    assert min(co2_values) >= 400  # the warm-up answer (0 ppm) was not published
