"""PMS5003 sleep and wake: warm-up discard, all-zero frames, sleeping between passive reads."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from drivers import OptionError, Reading
from drivers.pms5003 import FAMILY, Pms5003Driver, Pms5003Emulator, codec

POLL_S = 0.02


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


def make_driver(port: str, **settings: Any) -> Pms5003Driver:
    driver = FAMILY.create("air_1", FAMILY.parse_options("air_1", {"port": port, **settings}))
    assert isinstance(driver, Pms5003Driver)
    return driver


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.integration
def test_readings_within_warmup_after_a_wake_are_dropped_and_counted() -> None:
    collector = Collector()
    warmup_s = 0.5
    woke_at: list[float] = []
    with Pms5003Emulator(period_s=0.05, seed=21, wait_for_host=True, warmup_s=0.2) as emu:
        driver = make_driver(emu.port, warmup_s=warmup_s, silence_timeout_s=0.5)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 6, "frames before sleep")
                driver.sleep()
                await until(lambda: emu.asleep, "the sensor to sleep")
                await until(lambda: driver.state().reason == "asleep (on request)", "asleep")
                await asyncio.sleep(0.1)  # a frame already on the wire still arrives
                asleep_count = len(collector.readings)
                await asyncio.sleep(0.2)
                assert len(collector.readings) == asleep_count  # nothing while the fan is off
                woke_at.append(time.time())
                driver.wake()
                await until(lambda: len(collector.readings) >= asleep_count + 6, "warm readings")
            finally:
                await stop(task)

        asyncio.run(scenario())
        zero_frames = emu.zero_frames_sent

    after_wake = [r for r in collector.readings if r.time >= woke_at[0]]
    assert after_wake
    assert min(r.time for r in after_wake) - woke_at[0] >= 0.9 * warmup_s
    assert zero_frames >= 1  # the emulated fan did send blank frames ...
    assert all(r.value > 0 for r in collector.readings if r.quantity == "pm10")  # ... none got out
    counters = driver.state().counters
    assert counters["warmup_frames"] >= zero_frames
    assert counters["reopens"] == 0


@pytest.mark.integration
def test_all_zero_frames_right_after_a_wake_are_warmup_even_past_warmup_s() -> None:
    collector = Collector()
    with Pms5003Emulator(period_s=0.05, seed=22, wait_for_host=True, warmup_s=0.3) as emu:
        driver = make_driver(emu.port, warmup_s=0.0)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 3, "frames before sleep")
                driver.sleep()
                await until(lambda: emu.asleep, "the sensor to sleep")
                before = len(collector.readings)
                driver.wake()
                await until(lambda: len(collector.readings) >= before + 9, "warm readings")
            finally:
                await stop(task)

        asyncio.run(scenario())
        zero_frames = emu.zero_frames_sent
        commands = list(emu.commands)

    assert zero_frames >= 2
    assert driver.state().counters["warmup_frames"] == zero_frames
    assert 0.0 not in {r.value for r in collector.readings if r.quantity == "pm10"}
    assert commands.count((codec.CMD_SLEEP, codec.SLEEP)) == 1
    assert commands.count((codec.CMD_SLEEP, codec.WAKE)) == 2  # on open, and on request


@pytest.mark.integration
def test_sleeping_between_passive_reads_wakes_warmup_s_before_each_read() -> None:
    collector = Collector()
    settings = {
        "mode": "passive",
        "poll_interval_s": 0.5,
        "warmup_s": 0.2,
        "sleep_between_reads": True,
        "silence_timeout_s": 2.0,
    }
    with Pms5003Emulator(mode="passive", seed=23, warmup_s=0.1) as emu:
        driver = make_driver(emu.port, **settings)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 9, "three sleepy reads")
            finally:
                await stop(task)

        asyncio.run(scenario())
        commands = list(emu.commands)
        sent = emu.sent_values()

    frames = [r.time for r in collector.readings if r.quantity == "pm1"]
    gaps = [b - a for a, b in itertools.pairwise(frames)]
    assert all(gap >= 0.5 * 0.8 for gap in gaps)
    sleeps = commands.count((codec.CMD_SLEEP, codec.SLEEP))
    assert sleeps >= 2
    # each read is preceded by a wake: wake, read, sleep, wake, read, sleep ...
    cycle = [c for c in commands if c[0] in (codec.CMD_SLEEP, codec.CMD_READ)]
    assert cycle[:3] == [(codec.CMD_SLEEP, codec.WAKE), (codec.CMD_READ, 0), (codec.CMD_SLEEP, 0)]
    assert emu.zero_frames_sent == 0  # reads come after the fan has warmed up
    assert driver.state().counters["warmup_frames"] == 0
    pm = [(int(a.value), int(b.value), int(c.value)) for a, b, c in _triples(collector.readings)]
    assert pm == sent[: len(pm)]


def _triples(readings: list[Reading]) -> list[tuple[Reading, Reading, Reading]]:
    return [(readings[i], readings[i + 1], readings[i + 2]) for i in range(0, len(readings) - 2, 3)]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"sleep_between_reads": True}, "sleep_between_reads"),  # needs passive mode
        (
            {
                "mode": "passive",
                "sleep_between_reads": True,
                "poll_interval_s": 20,
                "silence_timeout_s": 60,
            },
            "sleep_between_reads",  # not longer than warmup_s (30 s)
        ),
        ({"sleep_between_reads": 1}, "sleep_between_reads"),
        ({"warmup_s": -1}, "warmup_s"),
    ],
)
def test_sleep_options_are_checked(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("air_1", {"port": "/dev/ttyAMA0", **settings})
    assert info.value.key == key


def test_sleep_between_reads_with_a_long_interval_is_accepted() -> None:
    table = {
        "port": "/dev/ttyAMA0",
        "mode": "passive",
        "poll_interval_s": 300,
        "silence_timeout_s": 600,
        "sleep_between_reads": True,
    }
    options = FAMILY.parse_options("air_1", table)
    assert getattr(options, "sleep_between_reads", None) is True
