"""The ruuvi driver on the shared scanner, fed by the emulator through bleak and the mock BlueZ."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import Driver, OptionError, Reading, family
from drivers.ble import Advertisement, set_unknown_listener
from drivers.ble.mockbluez import MockBlueZ
from drivers.ruuvi import FAMILY, RuuviDriver, RuuviEmulator, RuuviOptions, RuuviPayloads, codec
from drivers.ruuvi.driver import FIELDS_PER_FORMAT

TAG = "C9:44:54:29:E3:8D"
OTHER_TAG = "CB:B8:33:4C:88:4F"
SAMPLE = Path(codec.__file__).parent / "sample.toml"


class Batches:
    """The emit callback: one list of readings per measurement."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.batches.append(list(batch))

    def records(self) -> list[list[tuple[str, str, float]]]:
        return [[(r.quantity, r.unit, r.value) for r in batch] for batch in self.batches]


@pytest.fixture(scope="module")
def bluez() -> Iterator[MockBlueZ]:
    with MockBlueZ() as running:
        yield running


def make_driver(address: str = TAG, **settings: object) -> Driver:
    table = {"driver": "ruuvi", "address": address.lower(), **settings}
    return FAMILY.create("tag_1", FAMILY.parse_options("tag_1", table))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for {what}") from None


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def assert_contiguous(got: list[list[tuple[str, str, float]]], sent: list[bytes]) -> None:
    """The measurements received are consecutive measurements the tag sent, none invented."""
    decoded = [codec.decode(p) for p in sent]
    assert got, "no measurement received"
    assert any(got == decoded[k : k + len(got)] for k in range(len(decoded))), (got, decoded)


# -- through the real scanner ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("data_format", [codec.DF5, codec.DF6])
def test_readings_are_the_measurements_sent_and_repeated_adverts_are_dropped(
    bluez: MockBlueZ, data_format: int
) -> None:
    got = Batches()
    driver = make_driver()

    async def scenario() -> RuuviEmulator:
        task = asyncio.create_task(driver.run(got), name="ruuvi-readings")
        try:
            await until(lambda: "waiting" in driver.state().reason, "the scan to start")
            with RuuviEmulator(
                bluez, TAG, data_format=data_format, interval_s=0.05, repeats=3, seed=data_format
            ) as tag:
                await until(lambda: len(got.batches) >= 5, "five measurements")
                tag.send_duplicates(4)
                await until(lambda: len(got.batches) >= 7, "measurements after the duplicates")
                assert driver.state().available
                tag.set_silent(True)
                sent = list(tag.sent_payloads)
                await until(lambda: len(got.batches) == len(sent), "the last measurement")
                await until(
                    lambda: driver.state().counters["duplicates"] >= 2 * len(sent) + 4, "repeats"
                )
            return tag
        finally:
            await stop(task)

    tag = asyncio.run(scenario())
    assert_contiguous(got.records(), tag.sent_payloads)
    first = got.batches[0]
    assert {r.sensor for r in first} == {"tag_1"}
    assert len({r.time for r in first}) == 1
    assert len(first) == FIELDS_PER_FORMAT[data_format]  # no field was "not available"
    counters = driver.state().counters
    assert counters["measurements"] == len(got.batches)
    assert counters["duplicates"] == 2 * len(got.batches) + 4  # 3 adverts per measurement, +4
    assert counters["invalid"] == counters["sentinels"] == 0
    assert driver.state().reason == "stopped"


@pytest.mark.integration
def test_sentinel_fields_are_left_out_and_counted(bluez: MockBlueZ) -> None:
    got = Batches()
    driver = make_driver(silence_timeout_s=30)

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(got), name="ruuvi-sentinels")
        try:
            with RuuviEmulator(bluez, TAG, interval_s=0.05, repeats=1, seed=3) as tag:
                await until(lambda: len(got.batches) >= 2, "first measurements")
                tag.send_sentinels(["temperature", "humidity"])
                before = driver.state().counters["measurements"]
                await until(lambda: driver.state().counters["measurements"] >= before + 3, "more")
        finally:
            await stop(task)

    asyncio.run(scenario())
    quantities = [{r.quantity for r in batch} for batch in got.batches]
    gaps = [q for q in quantities if "temperature" not in q]
    assert len(gaps) == 1
    assert "humidity" not in gaps[0]
    assert "pressure" in gaps[0]
    assert driver.state().counters["sentinels"] == 2


@pytest.mark.integration
def test_a_removed_tag_turns_unavailable_after_the_silence_timeout_and_comes_back(
    bluez: MockBlueZ,
) -> None:
    got = Batches()
    driver = make_driver(silence_timeout_s=1)

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(got), name="ruuvi-removed")
        try:
            with RuuviEmulator(bluez, TAG, interval_s=0.05, seed=4) as tag:
                await until(lambda: driver.state().available, "the first measurement")
                tag.remove()
                await until(lambda: not driver.state().available, "the silence")
                assert driver.state().reason == "no valid advertisement for 1 s"
                before = len(got.batches)
                tag.restore()
                await until(lambda: driver.state().available, "the tag to come back")
                await until(lambda: len(got.batches) > before, "readings again")
        finally:
            await stop(task)

    asyncio.run(scenario())


@pytest.mark.integration
def test_without_bluez_the_driver_says_why_and_recovers_when_it_starts() -> None:
    got = Batches()
    driver = make_driver()

    async def scenario(own: MockBlueZ) -> None:
        task = asyncio.create_task(driver.run(got), name="ruuvi-no-bluez")
        try:
            await until(lambda: "BlueZ is not running" in driver.state().reason, "the reason")
            assert not driver.state().available
            own.start_bluez()
            with RuuviEmulator(own, TAG, interval_s=0.05, seed=8):
                await until(lambda: bool(got.batches), "readings once BlueZ runs")
        finally:
            await stop(task)

    with MockBlueZ() as own:  # a bus of its own: BlueZ is stopped and started here
        own.stop_bluez()
        asyncio.run(scenario(own))


@pytest.mark.integration
def test_a_tag_not_in_the_config_is_reported_to_the_unknown_hook(bluez: MockBlueZ) -> None:
    reports: list[tuple[str, str, int]] = []
    previous = set_unknown_listener(lambda *report: reports.append(report))
    driver = make_driver()

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(Batches()), name="ruuvi-unknown")
        try:
            with (
                RuuviEmulator(bluez, TAG, interval_s=0.05, seed=5),
                RuuviEmulator(bluez, OTHER_TAG, interval_s=0.05, seed=6),
            ):
                await until(lambda: bool(reports) and driver.state().available, "the report")
        finally:
            await stop(task)

    try:
        asyncio.run(scenario())
    finally:
        set_unknown_listener(previous)
    assert [(address, kind) for address, kind, _ in reports] == [(OTHER_TAG, "ruuvi")]
    assert -95 <= reports[0][2] <= -45


@pytest.mark.integration
def test_a_failing_emit_ends_run_with_its_exception(bluez: MockBlueZ) -> None:
    def broken(batch: Sequence[Reading]) -> None:
        raise RuntimeError("spool is gone")

    driver = make_driver()

    async def scenario() -> None:
        with RuuviEmulator(bluez, TAG, interval_s=0.05, seed=7):
            async with asyncio.timeout(10):
                await driver.run(broken)

    with pytest.raises(RuntimeError, match="spool is gone"):
        asyncio.run(scenario())


# -- options and decode --------------------------------------------------------------------------


def test_sample_config_is_accepted() -> None:
    table = tomllib.loads(SAMPLE.read_text())["sensors"]
    for sensor_id, entry in table.items():
        assert entry["driver"] == "ruuvi"
        assert isinstance(family("ruuvi").parse_options(sensor_id, entry), RuuviOptions)


def test_options_are_normalised_and_defaulted() -> None:
    options = FAMILY.parse_options("t", {"driver": "ruuvi", "address": "c9-44-54-29-e3-8d"})
    assert options == RuuviOptions(address=TAG, silence_timeout_s=60.0)
    assert isinstance(FAMILY.create("t", options), RuuviDriver)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({}, "address"),
        ({"address": "C9:44:54:29:E3"}, "address"),
        ({"address": TAG, "silence_timeout_s": 0}, "silence_timeout_s"),
        ({"address": TAG, "silence_timeout_s": "soon"}, "silence_timeout_s"),
        ({"address": TAG, "port": "/dev/ttyAMA0"}, "port"),
    ],
)
def test_option_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(OptionError) as caught:
        FAMILY.parse_options("t", {"driver": "ruuvi", **table})
    assert caught.value.key == key


def test_decode_accepts_a_whole_advertisement_and_notes_an_all_invalid_payload() -> None:
    payload = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    whole = bytes.fromhex("0201061BFF9904") + payload
    assert FAMILY.decode(whole, {}) == FAMILY.decode(payload, {})
    invalid = FAMILY.decode(bytes.fromhex("058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF"), {})
    assert invalid.records == []
    assert "not available" in invalid.note
    with pytest.raises(ValueError, match="data format 0x07"):
        FAMILY.decode(b"\x07" * 24, {})


@given(st.lists(st.binary(max_size=32), max_size=6))
def test_any_manufacturer_data_gets_a_verdict_never_an_exception(payloads: list[bytes]) -> None:
    judge = RuuviPayloads()
    for data in payloads:  # in sequence: the repeat filter sees them all
        verdict = judge.judge(Advertisement(TAG, -70, {codec.COMPANY_ID: data}, {}))
        assert verdict.kind in {"new", "repeat", "rejected"}
        assert (verdict.kind == "rejected") == bool(verdict.reason)


@given(st.binary(max_size=64))
def test_family_decode_gives_records_or_a_value_error(data: bytes) -> None:
    try:
        decoded = FAMILY.decode(data, {})
    except ValueError as exc:
        outcome = str(exc)
    else:
        outcome = "records" if decoded.records else decoded.note
    assert outcome.strip()  # records, a note saying why there are none, or a reason
