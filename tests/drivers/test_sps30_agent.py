"""SPS30 end to end: emulated sensor on a pty -> real `citygate run` -> real broker -> verifier;
and the sensor left stopped and asleep when the agent is stopped with SIGTERM."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.sps30 import Sps30Emulator, codec
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, Capture, capture, new_capture, write_config

pytestmark = pytest.mark.integration

UNITS = dict(codec.QUANTITIES)


async def _until(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


def samples(out: Capture, sensor: str) -> list[tuple[float, ...]]:
    """The ten values per sample the verifier saw, oldest first, duplicates dropped."""
    by_time: dict[float, dict[str, float]] = defaultdict(dict)
    seen: set[tuple[str, int]] = set()
    for message in out.messages:
        if (message.gateway_id, message.seq) in seen:
            continue
        seen.add((message.gateway_id, message.seq))
        for record in message.records:
            if record.sensor == sensor:
                assert record.u == UNITS[record.n]
                assert isinstance(record.v, float)
                by_time[record.t][record.n] = record.v
    complete = [values for _t, values in sorted(by_time.items()) if len(values) == len(UNITS)]
    return [tuple(values[name] for name in UNITS) for values in complete]


def test_samples_arrive_signed_and_sigterm_leaves_the_sensor_asleep(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])

    async def scenario() -> Sps30Emulator:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        with Sps30Emulator(sample_s=0.2, seed=31) as sensor:
            table = {"driver": "sps30", "port": sensor.port, "poll_interval_s": 0.2}
            config = write_config(tmp_path, lab, broker.port, {"air_3": table})
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            try:
                await _until(lambda: len(samples(out, "air_3")) >= 4, 30, "4 samples")
            finally:
                assert await agent.stop() == 0
            # the emulator thread handles the last command a moment after the agent exits
            await _until(lambda: sensor.asleep, 5, "the sensor asleep")
            stop.set()
            await watcher
            return sensor

    sensor = asyncio.run(scenario())
    got = samples(out, "air_3")
    assert out.failures == []
    assert got == sensor.sent_values()[: len(got)]  # every one, in order, none invented
    assert sensor.commands[-2:] == [(codec.CMD_STOP, b""), (codec.CMD_SLEEP, b"")]
    assert sensor.asleep
    assert not sensor.measuring
