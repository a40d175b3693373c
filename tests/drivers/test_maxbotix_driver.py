"""The MaxBotix driver against its emulator on a real pty, and end to end through the agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from drivers import Driver, Reading
from drivers.maxbotix import FAMILY, MaxbotixEmulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, capture, new_capture, write_config

pytestmark = pytest.mark.integration
POLL_S = 0.02


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)

    def values(self) -> list[float]:
        return [r.value for r in self.readings]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_driver(port: str, model: str, **settings: object) -> Driver:
    table = {"driver": "maxbotix", "port": port, "model": model, **settings}
    return FAMILY.create("bin_1", FAMILY.parse_options("bin_1", table))


def is_contiguous_part(got: list[float], sent: list[float]) -> bool:
    """True if `got` appears in `sent` as one unbroken run (frames sent before the port was
    opened are flushed by the open; after that nothing may be lost, reordered or invented)."""
    return any(sent[i : i + len(got)] == got for i in range(len(sent) - len(got) + 1))


@pytest.mark.parametrize("model", ["hrxl", "xl", "lv"])
def test_readings_are_the_distances_the_sensor_sent(model: str) -> None:
    collector = Collector()
    with MaxbotixEmulator(model=model, period_s=0.03, seed=1) as emu:
        driver = make_driver(emu.port, model)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 8, "eight distances")
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent = emu.sent_distances()
    assert {(r.sensor, r.quantity, r.unit) for r in collector.readings} == {
        ("bin_1", "distance", "m")
    }
    assert is_contiguous_part(collector.values(), sent)
    assert 0.3 <= min(collector.values()) <= max(collector.values()) < 2.0


def test_no_target_is_counted_and_never_published() -> None:
    collector = Collector()
    with MaxbotixEmulator(model="hrxl", period_s=0.03, seed=2) as emu:
        driver = make_driver(emu.port, "hrxl", silence_timeout_s=0.5)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 3, "first distances")
                emu.set_no_target(True)
                await until(lambda: driver.state().counters["no_echo"] >= 10, "no-echo frames")
                assert driver.state().available  # no echo is a live sensor, not silence
                emu.set_no_target(False)
                before = len(collector.readings)
                await until(lambda: len(collector.readings) >= before + 3, "distances again")
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent = emu.sent_distances()
    assert 5.0 not in collector.values()
    assert set(collector.values()) <= set(sent)
    assert emu.no_echo_sent >= driver.state().counters["no_echo"] >= 10


def test_noise_garbled_and_truncated_frames_are_skipped_and_counted() -> None:
    collector = Collector()
    with MaxbotixEmulator(model="hrxl", period_s=0.03, seed=3) as emu:
        driver = make_driver(emu.port, "hrxl")

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 3, "first distances")
                emu.inject_noise(50)
                emu.inject_bad_checksum()
                emu.inject_truncated()
                frames = driver.state().counters["frames"]
                await until(lambda: driver.state().counters["frames"] >= frames + 5, "recovery")
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent = emu.sent_distances()
    counters = driver.state().counters
    assert counters["bad_frames"] >= 1
    assert counters["bad_bytes"] >= 50
    assert set(collector.values()) <= set(sent)  # nothing invented from the garbage


def test_end_to_end_distances_reach_the_broker_signed(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])

    async def scenario() -> set[float]:
        stop_capture = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop_capture, subscribed))
        await subscribed.wait()
        with MaxbotixEmulator(model="hrxl", period_s=0.05, seed=4) as sensor:
            table = {"driver": "maxbotix", "port": sensor.port, "model": "hrxl"}
            config = write_config(tmp_path, lab, broker.port, {"bin_1": table})
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            try:

                def distances() -> list[tuple[str, str, float, float]]:
                    return [r for r in out.readings() if r[1] == "distance"]

                await until(lambda: len(distances()) >= 10, "distances at the verifier", 30)
                sensor.set_no_target(True)
                await asyncio.sleep(0.3)
                sensor.set_no_target(False)
                count = len(distances())
                await until(lambda: len(distances()) >= count + 5, "distances after no-echo", 30)
            finally:
                assert await agent.stop() == 0
            stop_capture.set()
            await watcher
            return set(sensor.sent_distances())

    sent = asyncio.run(scenario())
    assert out.failures == []
    got = [(sensor, value) for sensor, n, _t, value in out.readings() if n == "distance"]
    assert {sensor for sensor, _v in got} == {"bin_1"}
    assert {value for _s, value in got} <= sent
    assert 5.0 not in {value for _s, value in got}
