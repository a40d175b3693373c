"""A BLE sensor nobody configured is listed in the gateway's inventory for adoption.

The real agent runs with one configured RuuviTag; a second tag advertises
nearby. The agent must keep publishing the first, and list the second (with
its kind) in the TinyDB state file, without publishing its readings.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from drivers.ble.mockbluez import MockBlueZ
from drivers.ruuvi import RuuviEmulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, capture, new_capture, write_config

pytestmark = pytest.mark.integration

ADOPTED = "C9:44:54:29:E3:01"
STRANGER = "C9:44:54:29:E3:02"


def _inventory(state: Path) -> list[dict[str, object]]:
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return []
    return list(data.get("unknown_devices", {}).values())


def test_unconfigured_ble_sensor_is_listed_for_adoption_and_not_published(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])
    state = tmp_path / "state" / "state.json"

    async def scenario() -> None:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        with (
            MockBlueZ() as bluez,
            RuuviEmulator(bluez, ADOPTED, seed=1, interval_s=0.2),
            RuuviEmulator(bluez, STRANGER, seed=2, interval_s=0.2),
        ):
            config = write_config(
                tmp_path, lab, broker.port, {"tag_1": {"driver": "ruuvi", "address": ADOPTED}}
            )
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            try:
                async with asyncio.timeout(30):
                    while not _inventory(state) or not out.readings():
                        await asyncio.sleep(0.1)
            finally:
                assert await agent.stop() == 0
        stop.set()
        await watcher

    asyncio.run(scenario())
    (listed,) = _inventory(state)
    assert listed["address"] == STRANGER
    assert listed["kind"] == "ruuvi"
    assert {sensor for sensor, *_ in out.readings()} == {"tag_1"}
