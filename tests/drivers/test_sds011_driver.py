"""The SDS011 driver against its emulator on a real pseudo-terminal, under asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from drivers import Reading
from drivers.sds011 import FAMILY, Sds011Driver, Sds011Emulator, codec

pytestmark = pytest.mark.integration

POLL_S = 0.02


class Collector:
    """The emit callback: keeps every reading, in order."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        assert [r.quantity for r in batch] == ["pm2_5", "pm10"]
        self.readings.extend(batch)

    def pairs(self) -> list[tuple[float, float]]:
        values = [r.value for r in self.readings]
        return list(zip(values[0::2], values[1::2], strict=True))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after about `timeout_s`."""
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


def make_driver(port: str, **settings: object) -> Sds011Driver:
    table = {"driver": "sds011", "port": port, **settings}
    driver = FAMILY.create("air_2", FAMILY.parse_options("air_2", table))
    assert isinstance(driver, Sds011Driver)
    return driver


def run_with(
    driver: Sds011Driver, collector: Collector, body: Callable[[], Awaitable[None]]
) -> None:
    """Run the driver while `body` runs, then cancel it as the agent does."""

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(collector), name="sds011-under-test")
        try:
            await body()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def subs(emu: Sds011Emulator) -> list[tuple[int, int, int]]:
    """(sub-command, data2, data3) of every command the sensor received."""
    return [(sub, data[0], data[1]) for sub, data, _target in emu.commands]


GET_STATE = (codec.SUB_SLEEP, codec.GET, 0)
WORK = (codec.SUB_SLEEP, codec.SET, codec.WORK)
SLEEP = (codec.SUB_SLEEP, codec.SET, codec.SLEEP)
ACTIVE = (codec.SUB_MODE, codec.SET, codec.MODE_ACTIVE)
QUERY_MODE = (codec.SUB_MODE, codec.SET, codec.MODE_QUERY)
CONTINUOUS = (codec.SUB_PERIOD, codec.SET, 0)
FIRMWARE = (codec.SUB_FIRMWARE, codec.GET, 0)
QUERY = (codec.SUB_QUERY, 0, 0)


def test_active_mode_is_set_on_open_and_readings_match_the_stream() -> None:
    collector = Collector()
    # left in query mode with a 3-minute period by someone else: settings persist
    with Sds011Emulator(
        period_s=0.05, seed=1, mode="query", working_period_min=3, warmup_s=0.0
    ) as emu:
        driver = make_driver(emu.port, mode="active")

        async def body() -> None:
            await until(lambda: len(collector.readings) >= 20, "ten measurements")

        run_with(driver, collector, body)
        assert subs(emu)[:4] == [GET_STATE, ACTIVE, CONTINUOUS, FIRMWARE]
        assert not emu.query_mode
        assert emu.working_period_min == 0
        sent = emu.sent_values()
        assert collector.pairs() == sent[: len(collector.pairs())]

    state = driver.state()
    assert (state.available, state.reason) == (False, "stopped")
    assert state.counters["replies"] == 4
    assert state.counters["unmatched_replies"] == 0
    assert state.counters["bad_bytes"] == 0
    assert driver.protocol.firmware == "2015-07-10"
    assert {r.unit for r in collector.readings} == {"ug/m3"}


def test_replies_are_matched_by_type_while_measurements_keep_streaming() -> None:
    collector = Collector()
    with Sds011Emulator(period_s=0.01, seed=2, warmup_s=0.0, wait_for_host=True) as emu:
        driver = make_driver(emu.port, mode="active")

        async def body() -> None:
            await until(lambda: driver.protocol.firmware != "", "the start-up conversation")
            emu.inject_reply(codec.SUB_FIRMWARE)  # a reply nobody asked for
            await until(lambda: driver.state().counters["unmatched_replies"] == 1, "stray")
            frames = driver.state().counters["frames"]
            await until(lambda: driver.state().counters["frames"] > frames + 5, "more data")

        run_with(driver, collector, body)
        # a measurement every 10 ms is ~ one per command: replies arrive among them
        assert subs(emu)[:4] == [GET_STATE, ACTIVE, CONTINUOUS, FIRMWARE]
        assert collector.pairs() == emu.sent_values()[: len(collector.pairs())]
    assert driver.state().counters["lost_replies"] == 0


def test_query_mode_asks_for_each_measurement() -> None:
    collector = Collector()
    with Sds011Emulator(period_s=0.05, seed=3, warmup_s=0.0, wait_for_host=True) as emu:
        driver = make_driver(emu.port, mode="query", poll_interval_s=0.1, silence_timeout_s=2.0)

        async def body() -> None:
            await until(lambda: subs(emu).count(QUERY) >= 4, "four queries")
            await until(lambda: len(collector.readings) >= 8, "four answers")

        started = time.monotonic()
        run_with(driver, collector, body)
        elapsed = time.monotonic() - started
        commands = subs(emu)
        # paced, not flooding: never more queries than intervals elapsed (a slow run has fewer)
        assert commands.count(QUERY) <= elapsed / 0.1 + 1
        assert commands[:3] == [GET_STATE, QUERY_MODE, FIRMWARE]
        assert emu.query_mode
        assert len(collector.pairs()) >= commands.count(QUERY) - 1  # the last one may be pending
        # whatever the sensor streamed before the mode change was emitted too, in order
        assert collector.pairs() == emu.sent_values()[: len(collector.pairs())]


def test_a_sleeping_sensor_is_woken_and_its_warm_up_is_dropped() -> None:
    collector = Collector()
    with Sds011Emulator(period_s=0.05, seed=4, asleep=True, warmup_s=0.4) as emu:
        driver = make_driver(emu.port, mode="active", warmup_s=0.2)

        async def body() -> None:
            await until(lambda: len(collector.readings) >= 6, "measurements after warm-up")

        run_with(driver, collector, body)
        assert subs(emu)[:3] == [GET_STATE, WORK, ACTIVE]  # the question went unanswered
        assert not emu.asleep
        assert emu.zero_frames_sent >= 1
    counters = driver.state().counters
    assert counters["warmup_frames"] >= emu.zero_frames_sent
    assert counters["lost_replies"] == 0  # silence was the expected answer while asleep
    assert all(r.value > 0 for r in collector.readings)
    assert collector.pairs() == emu.sent_values()[: len(collector.pairs())]


def test_sleep_between_polls_wakes_queries_and_sleeps_and_leaves_it_asleep_on_stop() -> None:
    collector = Collector()
    with Sds011Emulator(seed=5, mode="query", warmup_s=0.0) as emu:
        driver = make_driver(
            emu.port,
            mode="query",
            poll_interval_s=1.2,
            sleep_between_polls=True,
            warmup_s=0.1,
            silence_timeout_s=5.0,
        )

        async def body() -> None:
            await until(lambda: len(collector.readings) >= 4 and emu.asleep, "two cycles")
            await until(lambda: not emu.asleep, "the wake-up for the third cycle")

        run_with(driver, collector, body)
        for _ in range(250):  # the emulator thread reads the last command a moment later
            if emu.asleep:
                break
            time.sleep(POLL_S)
        commands = [c for c in subs(emu) if c in (WORK, SLEEP, QUERY)]
        # first query right after start-up (the sensor was awake), then work/query/sleep cycles
        assert commands[:6] == [QUERY, SLEEP, WORK, QUERY, SLEEP, WORK]
        assert commands[-1] == SLEEP  # stopped while awake: the driver's last word
        assert emu.asleep
        assert collector.pairs() == emu.sent_values()
    assert driver.state().counters["warmup_frames"] == 0


def test_working_period_is_set_and_measurements_keep_coming() -> None:
    collector = Collector()
    with Sds011Emulator(
        period_s=0.02, seed=6, minute_s=0.05, warmup_s=0.0, wait_for_host=True
    ) as emu:
        driver = make_driver(emu.port, working_period_min=2, silence_timeout_s=121.0)

        async def body() -> None:
            await until(lambda: emu.working_period_min == 2, "the period setting")
            count = len(collector.readings)
            await until(lambda: len(collector.readings) >= count + 4, "two periodic reports")

        run_with(driver, collector, body)
        assert subs(emu)[:4] == [GET_STATE, ACTIVE, (codec.SUB_PERIOD, codec.SET, 2), FIRMWARE]
        assert collector.pairs() == emu.sent_values()[: len(collector.pairs())]


def test_line_faults_are_counted_and_never_turn_into_readings() -> None:
    collector = Collector()
    with Sds011Emulator(period_s=0.03, seed=7, warmup_s=0.0, wait_for_host=True) as emu:
        driver = make_driver(emu.port)

        async def body() -> None:
            await until(lambda: len(collector.readings) >= 6, "first measurements")
            emu.inject_noise(200)
            emu.inject_bad_checksum()
            emu.inject_truncated()
            emu.inject_noise(7)
            frames = driver.state().counters["frames"]
            await until(lambda: driver.state().counters["frames"] >= frames + 5, "recovery")

        run_with(driver, collector, body)
        sent = emu.sent_values()
    counters = driver.state().counters
    assert counters["bad_frames"] >= 1
    assert counters["bad_bytes"] >= 200 + 10 + 7
    assert collector.pairs() == sent[: len(collector.pairs())]  # nothing lost or invented


def test_lost_replies_are_retried() -> None:
    collector = Collector()
    with Sds011Emulator(period_s=0.05, seed=8, warmup_s=0.0) as emu:
        emu.ignore_commands(2)  # the state question and the first "work" vanish
        driver = make_driver(
            emu.port, mode="query", poll_interval_s=0.2, warmup_s=0.1, silence_timeout_s=5.0
        )

        async def body() -> None:
            await until(lambda: subs(emu).count(QUERY) >= 2, "queries after the retries")

        run_with(driver, collector, body)
        commands = subs(emu)
        # unanswered state question -> "work" (harmless when awake), sent twice, then the mode
        assert commands[:4] == [GET_STATE, WORK, WORK, QUERY_MODE]
        assert emu.query_mode
    assert driver.state().counters["lost_replies"] == 0


def test_replug_reapplies_the_settings_and_readings_resume(tmp_path: Path) -> None:
    collector = Collector()
    link = str(tmp_path / "ttySDS")
    with Sds011Emulator(period_s=0.05, seed=9, link=link, warmup_s=0.0) as emu:
        driver = make_driver(link, mode="query", poll_interval_s=0.1, silence_timeout_s=2.0)

        async def body() -> None:
            await until(lambda: len(collector.readings) >= 4, "answers before unplug")
            emu.unplug()
            await until(lambda: not driver.state().available, "the hang-up")
            assert driver.state().reason.startswith("port lost")
            before = len(emu.commands)
            emu.replug()
            count = len(collector.readings)
            await until(lambda: len(collector.readings) >= count + 4, "answers after replug")
            assert subs(emu)[before : before + 3] == [GET_STATE, QUERY_MODE, FIRMWARE]

        run_with(driver, collector, body)
    assert driver.state().counters["reopens"] >= 1
