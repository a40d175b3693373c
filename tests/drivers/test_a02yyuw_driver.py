"""The A02YYUW / JSN-SR04T driver against its emulator on a real pty, and end to end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from drivers import Driver, Reading
from drivers.a02yyuw import FAMILY, A02yyuwEmulator
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

    def mm(self) -> list[int]:
        return [round(r.value * 1000) for r in self.readings]


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


def make_driver(port: str, **settings: object) -> Driver:
    table = {"driver": "a02yyuw", "port": port, **settings}
    return FAMILY.create("bin_2", FAMILY.parse_options("bin_2", table))


def is_contiguous_part(got: list[int], sent: list[int]) -> bool:
    return any(sent[i : i + len(got)] == got for i in range(len(sent) - len(got) + 1))


def test_streamed_distances_are_the_ones_the_sensor_sent() -> None:
    collector = Collector()
    with A02yyuwEmulator(period_s=0.02, seed=1) as emu:
        driver = make_driver(emu.port)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 10, "ten distances")
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent = emu.sent_values()
    assert {(r.sensor, r.quantity, r.unit) for r in collector.readings} == {
        ("bin_2", "distance", "m")
    }
    assert is_contiguous_part(collector.mm(), sent)
    assert driver.state().counters["triggers"] == 0


def test_triggered_mode_sends_0x55_each_poll_and_gets_one_frame_each() -> None:
    collector = Collector()
    with A02yyuwEmulator(model="jsn_sr04t", mode="triggered", seed=2) as emu:
        driver = make_driver(emu.port, model="jsn_sr04t", mode="triggered", poll_interval_s=0.1)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 5, "five triggered distances")
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent, triggers = emu.sent_values(), emu.triggers
    counters = driver.state().counters
    assert triggers == len(sent) >= 5  # one frame per trigger byte, none without one
    assert counters["triggers"] >= triggers
    assert collector.mm() == sent[: len(collector.mm())]  # nothing flushed: it only answers


def test_the_silent_untriggered_jsn_sends_nothing_in_triggered_mode() -> None:
    with A02yyuwEmulator(model="jsn_sr04t", mode="triggered", seed=3) as emu:
        emu.set_silent(False)  # a round trip through the device thread: it is running
        assert (emu.frames_sent, emu.bytes_sent) == (0, 0)


def test_data_bytes_of_0xff_blind_zone_and_no_echo() -> None:
    collector = Collector()
    with A02yyuwEmulator(period_s=0.02, seed=4) as emu:
        driver = make_driver(emu.port)

        def count(key: str) -> int:
            return driver.state().counters[key]

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 2, "first distances")
                emu.force_mm(511)  # FF 01 FF FF
                await until(lambda: 511 in collector.mm(), "511 mm")
                emu.force_mm(20)
                await until(lambda: count("below_range") >= 3, "blind-zone frames")
                emu.force_mm(0)
                await until(lambda: count("no_echo") >= 3, "no-echo frames")
                emu.force_mm(None)
                before = len(collector.readings)
                await until(lambda: len(collector.readings) >= before + 3, "distances again")
            finally:
                await stop(task)

        asyncio.run(scenario())
    assert 20 not in collector.mm()
    assert 0 not in collector.mm()
    assert driver.state().counters["bad_frames"] == 0  # the 0xFF bytes never cost a frame
    assert driver.state().available is False  # stopped


def test_bad_checksums_and_noise_are_skipped_and_counted() -> None:
    collector = Collector()
    with A02yyuwEmulator(period_s=0.02, seed=5) as emu:
        driver = make_driver(emu.port)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 2, "first distances")
                emu.inject_bad_checksum()
                emu.inject_noise(40)
                emu.inject_truncated()
                frames = driver.state().counters["frames"]
                await until(lambda: driver.state().counters["frames"] >= frames + 5, "recovery")
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent = emu.sent_values()
    assert emu.bad_frames_sent == 1
    assert driver.state().counters["bad_bytes"] >= 4
    assert set(collector.mm()) <= set(sent)


def test_end_to_end_triggered_distances_reach_the_broker_signed(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])

    def distances() -> list[tuple[str, str, float, float]]:
        return [r for r in out.readings() if r[1] == "distance"]

    async def scenario() -> list[int]:
        stop_capture = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop_capture, subscribed))
        await subscribed.wait()
        with A02yyuwEmulator(model="jsn_sr04t", mode="triggered", seed=6) as sensor:
            table = {
                "driver": "a02yyuw",
                "port": sensor.port,
                "model": "jsn_sr04t",
                "mode": "triggered",
                "poll_interval_s": 0.1,
            }
            config = write_config(tmp_path, lab, broker.port, {"bin_2": table})
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            try:
                await until(lambda: len(distances()) >= 10, "distances at the verifier", 30)
                sensor.set_silent(True)
                await asyncio.sleep(0.3)  # what is on the wire arrives
                sent = sensor.sent_values()
                await until(lambda: len(distances()) >= len(sent), "every distance sent", 30)
            finally:
                assert await agent.stop() == 0
            stop_capture.set()
            await watcher
            return sent

    sent = asyncio.run(scenario())
    assert out.failures == []
    got = sorted(distances(), key=lambda r: r[2])
    assert {r[0] for r in got} == {"bin_2"}
    assert [round(r[3] * 1000) for r in got] == sent  # every triggered frame, in order
