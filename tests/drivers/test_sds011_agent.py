"""SDS011 end to end: emulated sensor on a pty -> real `citygate run` -> real broker -> verifier."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.sds011 import Sds011Emulator, codec
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, Capture, capture, new_capture, write_config

pytestmark = pytest.mark.integration


async def _until(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


def measurements(out: Capture, sensor: str) -> list[tuple[float, float]]:
    """(pm2_5, pm10) per measurement the verifier saw, oldest first, duplicates dropped."""
    by_time: dict[float, dict[str, float]] = defaultdict(dict)
    seen: set[tuple[str, int]] = set()
    for message in out.messages:
        if (message.gateway_id, message.seq) in seen:
            continue
        seen.add((message.gateway_id, message.seq))
        for record in message.records:
            if record.sensor == sensor:
                assert record.u == "ug/m3"
                assert isinstance(record.v, float)
                by_time[record.t][record.n] = record.v
    return [(values["pm2_5"], values["pm10"]) for _t, values in sorted(by_time.items())]


def test_query_mode_measurements_arrive_signed_at_the_verifier(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])

    async def scenario() -> Sds011Emulator:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        # left streaming in active mode: the driver must switch it to query mode itself
        with Sds011Emulator(period_s=0.1, seed=21, warmup_s=0.0, wait_for_host=True) as sensor:
            table = {
                "driver": "sds011",
                "port": sensor.port,
                "mode": "query",
                "poll_interval_s": 0.2,
                "silence_timeout_s": 5.0,
            }
            config = write_config(tmp_path, lab, broker.port, {"air_2": table})
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            try:
                await _until(lambda: len(measurements(out, "air_2")) >= 5, 30, "5 measurements")
            finally:
                assert await agent.stop() == 0
            stop.set()
            await watcher
            return sensor

    sensor = asyncio.run(scenario())
    got = measurements(out, "air_2")
    assert out.failures == []
    assert got == sensor.sent_values()[: len(got)]  # every one, in order, none invented
    assert sensor.query_mode
    assert (codec.SUB_QUERY, b"\x00" * 12, codec.ANY_DEVICE) in sensor.commands
