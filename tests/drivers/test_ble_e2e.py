"""BLE sensors end to end: emulator -> mock BlueZ -> the real `citygate run` (bleak inside)
-> spool -> signed MQTT on the real broker -> verifier.

The agent is a subprocess; it finds the private bus through
DBUS_SYSTEM_BUS_ADDRESS, which it inherits from this process's environment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.ble.emulation import AdvertisingEmulator
from drivers.ble.mockbluez import ENV_VAR, MockBlueZ
from drivers.bthome import BTHomeEmulator
from drivers.bthome import codec as bthome_codec
from drivers.ruuvi import RuuviEmulator
from drivers.ruuvi import codec as ruuvi_codec
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, Capture, capture, new_capture, write_config

pytestmark = pytest.mark.integration

TAG = "C9:44:54:29:E3:8D"
CLIMATE = "54:48:E6:8F:80:A5"
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"
MEASUREMENTS = 8


async def _until(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


def _run_agent_with(
    lab: LabFiles,
    broker: LabBroker,
    tmp_path: Path,
    sensor: tuple[str, dict[str, object]],
    emulator: Callable[[], AdvertisingEmulator],
) -> tuple[Capture, AdvertisingEmulator, str]:
    """Run the agent with one BLE sensor until MEASUREMENTS of its measurements are verified."""
    out = new_capture(lab, ["gw-a"])
    sensor_id, table = sensor
    config = write_config(tmp_path, lab, broker.port, {sensor_id: table})
    agent = AgentProcess(config, tmp_path / "agent.log")

    def temperatures() -> int:
        return sum(1 for r in out.readings() if r[0] == sensor_id and r[1] == "temperature")

    async def scenario() -> AdvertisingEmulator:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        with emulator() as device:
            await agent.start()
            try:
                await _until(lambda: temperatures() >= MEASUREMENTS, 30, "verified readings")
            finally:
                assert await agent.stop() == 0
        stop.set()
        await watcher
        return device

    device = asyncio.run(scenario())
    return out, device, agent.output()


def _received(out: Capture, sensor_id: str) -> dict[str, list[float]]:
    by_quantity: dict[str, list[float]] = {}
    for sensor, quantity, _t, value in sorted(out.readings(), key=lambda r: r[2]):
        if sensor == sensor_id:
            by_quantity.setdefault(quantity, []).append(value)
    return by_quantity


def _sent(decoded: list[list[tuple[str, str, float]]]) -> dict[str, list[float]]:
    by_quantity: dict[str, list[float]] = {}
    for records in decoded:
        for quantity, _unit, value in records:
            by_quantity.setdefault(quantity, []).append(value)
    return by_quantity


def _assert_once_each_and_in_order(got: list[float], sent: list[float]) -> None:
    """Each measurement arrives once (repeats dropped), in order, as consecutive ones sent."""
    runs = [sent[k : k + len(got)] for k in range(len(sent) - len(got) + 1)]
    assert any(got == pytest.approx(run) for run in runs), (got, sent)


def test_ruuvi_tag_readings_reach_the_verifier_signed(
    lab: LabFiles, broker: LabBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with MockBlueZ(export_env=False) as bluez:
        monkeypatch.setenv(ENV_VAR, bluez.bus_address)
        out, device, log = _run_agent_with(
            lab,
            broker,
            tmp_path,
            ("tag_1", {"driver": "ruuvi", "address": TAG.lower()}),
            lambda: RuuviEmulator(bluez, TAG, interval_s=0.1, repeats=3, seed=11),
        )
    assert out.failures == []
    assert isinstance(device, RuuviEmulator)
    got = _received(out, "tag_1")
    sent = _sent([ruuvi_codec.decode(p) for p in device.sent_payloads])
    assert set(got) == set(sent)  # every quantity of the tag, nothing else
    _assert_once_each_and_in_order(got["temperature"], sent["temperature"])
    assert "tag_1: receiving advertisements" in log


def test_encrypted_bthome_readings_reach_the_verifier_signed(
    lab: LabFiles, broker: LabBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = bytes.fromhex(KEY_HEX)
    with MockBlueZ(export_env=False) as bluez:
        monkeypatch.setenv(ENV_VAR, bluez.bus_address)
        out, device, log = _run_agent_with(
            lab,
            broker,
            tmp_path,
            ("climate_1", {"driver": "bthome", "address": CLIMATE, "key": KEY_HEX}),
            lambda: BTHomeEmulator(bluez, CLIMATE, key=key, interval_s=0.1, repeats=3, seed=12),
        )
    assert out.failures == []
    assert isinstance(device, BTHomeEmulator)
    got = _received(out, "climate_1")
    sent = _sent([bthome_codec.decode(p) for p in device.sent_plain])
    assert set(got) == {"battery", "temperature", "humidity", "pressure"}
    _assert_once_each_and_in_order(got["temperature"], sent["temperature"])
    _assert_once_each_and_in_order(got["pressure"], sent["pressure"])
    assert "climate_1: receiving advertisements" in log
