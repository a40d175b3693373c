"""The PMS5003 driver against the emulator on a real pseudo-terminal, under asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from drivers import Driver, Reading
from drivers.pms5003 import FAMILY, Pms5003Emulator, codec

pytestmark = pytest.mark.integration

POLL_S = 0.02


class Collector:
    """The emit callback: keeps every reading, in order."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)

    def triples(self) -> list[tuple[int, int, int]]:
        """(pm1, pm2_5, pm10) per frame, as the emulator records what it sent."""
        values = [int(r.value) for r in self.readings]
        return [(values[i], values[i + 1], values[i + 2]) for i in range(0, len(values) - 2, 3)]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after about `timeout_s`."""
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


def open_fds_on(path: str) -> int:
    """How many of this process's fds refer to the device behind `path`."""
    target = os.path.realpath(path)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == target
    return count


def make_driver(port: str, **settings: object) -> Driver:
    table = {"driver": "pms5003", "port": port, **settings}
    return FAMILY.create("air_1", FAMILY.parse_options("air_1", table))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_active_mode_readings_match_the_frames_the_sensor_sent() -> None:
    collector = Collector()
    with Pms5003Emulator(period_s=0.05, seed=1, wait_for_host=True) as emu:
        driver = make_driver(emu.port, mode="active")
        held_by_emulator = open_fds_on(emu.port)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector), name="pms5003-active")
            try:
                await until(lambda: len(collector.readings) >= 15, "five frames")
                assert open_fds_on(emu.port) == held_by_emulator + 1
            finally:
                await stop(task)

        asyncio.run(scenario())
        assert emu.commands[0] == (codec.CMD_MODE, codec.MODE_ACTIVE)
        assert collector.triples() == emu.sent_values()[: len(collector.triples())]
        assert open_fds_on(emu.port) == held_by_emulator  # the driver closed its port

    first = collector.readings[:3]
    assert [(r.sensor, r.quantity, r.unit) for r in first] == [
        ("air_1", "pm1", "ug/m3"),
        ("air_1", "pm2_5", "ug/m3"),
        ("air_1", "pm10", "ug/m3"),
    ]
    assert len({r.time for r in first}) == 1
    state = driver.state()
    assert (state.available, state.reason) == (False, "stopped")
    assert state.counters["acks"] == 1
    assert state.counters["bad_bytes"] == 0


def test_passive_mode_polls_for_each_frame() -> None:
    collector = Collector()
    with Pms5003Emulator(mode="passive", seed=2) as emu:
        driver = make_driver(emu.port, mode="passive", poll_interval_s=0.1, silence_timeout_s=2.0)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector), name="pms5003-passive")
            try:
                await until(lambda: len(collector.readings) >= 9, "three polled frames")
                assert driver.state().available
            finally:
                await stop(task)

        asyncio.run(scenario())
        commands = list(emu.commands)
        assert commands[0] == (codec.CMD_MODE, codec.MODE_PASSIVE)
        assert commands.count((codec.CMD_READ, 0)) >= emu.frames_sent >= 3
        assert collector.triples() == emu.sent_values()[: len(collector.triples())]


def test_noise_and_bad_checksums_are_counted_and_readings_continue() -> None:
    collector = Collector()
    with Pms5003Emulator(period_s=0.05, seed=3, wait_for_host=True) as emu:
        driver = make_driver(emu.port)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector), name="pms5003-noise")
            try:
                await until(lambda: len(collector.readings) >= 6, "first frames")
                emu.inject_noise(200)
                emu.inject_bad_checksum()
                emu.inject_noise(31)
                frames = driver.state().counters["frames"]
                await until(
                    lambda: driver.state().counters["frames"] >= frames + 3, "frames after noise"
                )
            finally:
                await stop(task)

        asyncio.run(scenario())
        sent = emu.sent_values()

    counters = driver.state().counters
    assert emu.bad_frames_sent == 1
    assert counters["bad_frames"] >= 1
    assert counters["bad_bytes"] >= 200 + 32 + 31
    assert collector.triples() == sent[: len(collector.triples())]  # nothing lost or invented


def test_silent_sensor_is_unavailable_until_frames_return() -> None:
    collector = Collector()
    with Pms5003Emulator(period_s=0.05, seed=4, wait_for_host=True) as emu:
        driver = make_driver(emu.port, silence_timeout_s=0.5)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector), name="pms5003-silent")
            try:
                await until(lambda: driver.state().available, "first frame")
                emu.set_silent(True)
                await until(lambda: not driver.state().available, "silence to be noticed")
                assert driver.state().reason == "silent for 0.5 s"
                emu.set_silent(False)
                await until(lambda: driver.state().available, "frames to return")
            finally:
                await stop(task)

        asyncio.run(scenario())
    assert driver.state().counters["reopens"] == 0  # silence is not a reason to reopen


def test_unplug_marks_unavailable_and_replug_resumes_without_restart(tmp_path: Path) -> None:
    collector = Collector()
    link = str(tmp_path / "ttyPMS")
    with Pms5003Emulator(period_s=0.05, seed=5, wait_for_host=True, link=link) as emu:
        driver = make_driver(link)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector), name="pms5003-replug")
            try:
                await until(lambda: len(collector.readings) >= 6, "frames before unplug")
                old_port = emu.port
                emu.unplug()
                await until(lambda: not driver.state().available, "the hang-up")
                assert driver.state().reason.startswith("port lost: hung up")
                assert open_fds_on(old_port) == 0
                before = len(collector.readings)
                emu.replug()
                await until(lambda: len(collector.readings) >= before + 6, "frames after replug")
                assert driver.state().available
                assert open_fds_on(link) == 2  # the emulator's slave and the driver's
            finally:
                await stop(task)

        asyncio.run(scenario())
        assert open_fds_on(link) == 1  # only the emulator's own slave fd is left

    assert driver.state().counters["reopens"] >= 1


def test_a_second_driver_on_the_same_port_is_refused_while_the_first_keeps_reading() -> None:
    async def scenario() -> tuple[str, int, int, int]:
        with Pms5003Emulator(period_s=0.05, seed=11) as sensor:
            first = FAMILY.create("air_1", FAMILY.parse_options("air_1", {"port": sensor.port}))
            second = FAMILY.create("air_2", FAMILY.parse_options("air_2", {"port": sensor.port}))
            got_first: list[Reading] = []
            got_second: list[Reading] = []
            tasks = [asyncio.create_task(first.run(got_first.extend))]
            for _ in range(500):
                if got_first:
                    break
                await asyncio.sleep(0.02)
            tasks.append(asyncio.create_task(second.run(got_second.extend)))
            for _ in range(500):
                if "cannot open" in second.state().reason:
                    break
                await asyncio.sleep(0.02)
            reason, before = second.state().reason, len(got_first)
            await asyncio.sleep(0.3)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return reason, before, len(got_first), len(got_second)

    reason, before, after, second_count = asyncio.run(scenario())
    assert "cannot open" in reason
    assert second_count == 0
    assert after > before
