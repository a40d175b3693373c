"""The SPS30 driver against its emulator on a real pseudo-terminal, under asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from drivers import Reading
from drivers.sps30 import FAMILY, Sps30Driver, Sps30Emulator, codec

pytestmark = pytest.mark.integration

POLL_S = 0.02
NAMES = [name for name, _unit in codec.QUANTITIES]
FLOAT_START = (codec.CMD_START, bytes([1, codec.FORMAT_FLOAT]))
STARTUP = [(codec.CMD_WAKE, b""), (codec.CMD_STOP, b""), FLOAT_START]


class Collector:
    """The emit callback: keeps every batch (one batch per sample)."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        assert [r.quantity for r in batch] == NAMES
        self.batches.append(list(batch))

    def samples(self) -> list[tuple[float, ...]]:
        return [tuple(r.value for r in batch) for batch in self.batches]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after about `timeout_s`."""
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


def settle(condition: Callable[[], bool]) -> bool:
    """Wait (synchronously) for the emulator thread to catch up with the last command."""
    for _ in range(250):
        if condition():
            return True
        time.sleep(POLL_S)
    return False


def make_driver(port: str, **settings: object) -> Sps30Driver:
    table = {"driver": "sps30", "port": port, "poll_interval_s": 0.2, **settings}
    driver = FAMILY.create("air_3", FAMILY.parse_options("air_3", table))
    assert isinstance(driver, Sps30Driver)
    return driver


def run_with(
    driver: Sps30Driver, collector: Collector, body: Callable[[], Awaitable[None]]
) -> None:
    """Run the driver while `body` runs, then cancel it as the agent does."""

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(collector), name="sps30-under-test")
        try:
            await body()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def cmds(emu: Sps30Emulator) -> list[tuple[int, bytes]]:
    return list(emu.commands)


def test_measurement_is_started_polled_and_stopped_into_sleep() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.3, seed=1) as emu:
        driver = make_driver(emu.port, poll_interval_s=0.2)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 3, "three samples")
            assert driver.state().available

        run_with(driver, collector, body)
        assert settle(lambda: emu.asleep)
        commands = cmds(emu)
        assert commands[:4] == [*STARTUP, (codec.CMD_INFO, bytes([codec.INFO_SERIAL]))]
        assert commands[-2:] == [(codec.CMD_STOP, b""), (codec.CMD_SLEEP, b"")]
        assert not emu.measuring
        assert collector.samples() == emu.sent_values()[: len(collector.samples())]

    counters = driver.state().counters
    assert counters["empty_reads"] >= 1  # polled faster than the sensor samples
    assert counters["bad_bytes"] == 0
    assert counters["state_errors"] == 0  # nothing to wake or stop: refused, as expected
    assert driver.protocol.serial_number == emu.serial_number
    first = collector.batches[0]
    assert [r.unit for r in first] == [unit for _name, unit in codec.QUANTITIES]
    assert len({r.time for r in first}) == 1


def test_uint16_output_is_requested_and_decoded() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.1, seed=2) as emu:
        driver = make_driver(emu.port, output="uint16", sleep_on_stop=False)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 3, "three samples")

        run_with(driver, collector, body)
        assert settle(lambda: not emu.measuring)
        assert (codec.CMD_START, bytes([1, codec.FORMAT_UINT16])) in cmds(emu)
        assert emu.output_format == codec.FORMAT_UINT16
        assert not emu.asleep  # sleep_on_stop = false: stopped only
        assert collector.samples() == emu.sent_values()[: len(collector.samples())]
    assert all(0.3 < sample[9] < 1.0 for sample in collector.samples())  # nm -> um


def test_a_sleeping_sensor_is_woken_with_a_pulse_first() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.1, seed=3, asleep=True) as emu:
        driver = make_driver(emu.port)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 2, "samples after wake-up")

        run_with(driver, collector, body)
        assert cmds(emu)[:3] == STARTUP
    assert driver.state().counters["state_errors"] == 0


def test_a_measurement_left_running_is_restarted_in_our_format() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.1, seed=4, measuring=True) as emu:
        driver = make_driver(emu.port)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 2, "samples")

        run_with(driver, collector, body)
        assert cmds(emu)[:3] == STARTUP
    assert driver.state().counters["state_errors"] == 0


def test_refusals_are_reported_and_a_lost_measurement_is_started_again() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.1, seed=5) as emu:
        driver = make_driver(emu.port, poll_interval_s=0.2)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 2, "first samples")
            errors = driver.state().counters["state_errors"]
            emu.inject_state_error(0x28)  # a read refused
            await until(lambda: driver.state().counters["state_errors"] > errors, "refusal")
            count = len(collector.batches)
            await until(lambda: len(collector.batches) > count, "a sample after the restart")
            count = len(collector.batches)
            emu.power_cycle()  # the measurement stops: reads answer 0x43 until restarted
            await until(lambda: len(collector.batches) >= count + 2, "samples after restart")

        run_with(driver, collector, body)
        starts = [c for c in cmds(emu) if c == FLOAT_START]
        assert len(starts) >= 3  # at open, after the refused read, after the power cycle
        assert collector.samples() == emu.sent_values()[: len(collector.samples())]


def test_device_error_flag_leads_to_one_status_read_and_readings_continue() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.1, seed=6) as emu:
        driver = make_driver(emu.port, poll_interval_s=0.2)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 2, "first samples")
            emu.set_device_error(True)
            count = len(collector.batches)
            await until(lambda: len(collector.batches) >= count + 3, "samples while flagged")

        run_with(driver, collector, body)
        assert cmds(emu).count((codec.CMD_STATUS, b"\x00")) == 1
    assert driver.state().counters["device_errors"] == 1


def test_line_faults_are_counted_and_never_turn_into_readings() -> None:
    collector = Collector()
    with Sps30Emulator(sample_s=0.1, seed=7) as emu:
        driver = make_driver(emu.port, poll_interval_s=0.2)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 2, "first samples")
            emu.inject_noise(100)
            emu.inject_bad_checksum()
            emu.inject_truncated()
            emu.ignore_commands(1)  # a reply lost: the read is asked again
            frames = driver.state().counters["frames"]
            await until(lambda: driver.state().counters["frames"] >= frames + 4, "recovery")

        run_with(driver, collector, body)
        sent = emu.sent_values()
    counters = driver.state().counters
    assert counters["bad_frames"] >= 1
    assert counters["bad_bytes"] >= 100
    assert counters["lost_replies"] == 0  # retried in time
    assert collector.samples() == sent[: len(collector.samples())]


def test_unplug_marks_unavailable_and_replug_starts_measuring_again(tmp_path: Path) -> None:
    collector = Collector()
    link = str(tmp_path / "ttySPS")
    with Sps30Emulator(sample_s=0.1, seed=8, link=link) as emu:
        driver = make_driver(link)

        async def body() -> None:
            await until(lambda: len(collector.batches) >= 2, "samples before unplug")
            emu.unplug()
            await until(lambda: not driver.state().available, "the hang-up")
            assert driver.state().reason.startswith("port lost")
            emu.replug()
            count = len(collector.batches)
            await until(lambda: len(collector.batches) >= count + 2, "samples after replug")

        run_with(driver, collector, body)
        assert cmds(emu).count(FLOAT_START) == 2
    assert driver.state().counters["reopens"] >= 1
