"""The bthome driver on the shared scanner, fed by the emulator through bleak and the mock BlueZ:
deduplication, encryption (bad MIC, replays, missing key) and availability."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import Driver, OptionError, Reading, family
from drivers.ble import BTHOME_UUID, Advertisement, set_unknown_listener
from drivers.ble.mockbluez import MockBlueZ
from drivers.bthome import (
    FAMILY,
    BTHomeDriver,
    BTHomeEmulator,
    BTHomeOptions,
    BTHomePayloads,
    codec,
    crypto,
)

DEVICE = "54:48:E6:8F:80:A5"
OTHER = "A4:C1:38:00:11:22"
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"
KEY = bytes.fromhex(KEY_HEX)
WRONG_KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db933")
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


def make_driver(**settings: object) -> Driver:
    table = {"driver": "bthome", "address": DEVICE, **settings}
    return FAMILY.create("climate_1", FAMILY.parse_options("climate_1", table))


def counters(driver: Driver) -> dict[str, int]:
    return dict(driver.state().counters)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for {what}") from None


@contextlib.asynccontextmanager
async def running(driver: Driver, emit: Batches, name: str) -> AsyncIterator[None]:
    task = asyncio.create_task(driver.run(emit), name=name)
    try:
        await until(lambda: "waiting" in driver.state().reason, "the scan to start")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def assert_contiguous(got: list[list[tuple[str, str, float]]], sent: list[bytes]) -> None:
    """The measurements received are consecutive measurements the device sent, none invented."""
    decoded = [codec.decode(p) for p in sent]
    assert got, "no measurement received"
    assert any(got == decoded[k : k + len(got)] for k in range(len(decoded))), (got, decoded)


# -- through the real scanner ------------------------------------------------------------------


@pytest.mark.integration
def test_plain_readings_arrive_once_per_packet_id(bluez: MockBlueZ) -> None:
    got = Batches()
    driver = make_driver()

    async def scenario() -> BTHomeEmulator:
        async with running(driver, got, "bthome-plain"):
            with BTHomeEmulator(bluez, DEVICE, interval_s=0.05, repeats=3, seed=1) as device:
                await until(lambda: len(got.batches) >= 5, "five measurements")
                device.send_duplicates(3)
                device.set_silent(True)
                sent = len(device.sent_plain)
                await until(lambda: len(got.batches) == sent, "the last measurement")
                await until(lambda: counters(driver)["duplicates"] >= 2 * sent + 3, "repeats")
                assert driver.state().available
        return device

    device = asyncio.run(scenario())
    assert_contiguous(got.records(), device.sent_plain)
    assert [q for q, _, _ in got.records()[0]] == ["battery", "temperature", "humidity", "pressure"]
    seen = counters(driver)
    assert seen["measurements"] == len(got.batches)
    assert seen["duplicates"] == 2 * len(got.batches) + 3
    assert seen["bad_mic"] == seen["replays"] == seen["invalid"] == 0


@pytest.mark.integration
def test_encrypted_packets_are_decrypted_and_forgeries_and_replays_rejected(
    bluez: MockBlueZ,
) -> None:
    got = Batches()
    driver = make_driver(key=KEY_HEX)

    async def scenario() -> BTHomeEmulator:
        async with running(driver, got, "bthome-encrypted"):
            with BTHomeEmulator(bluez, DEVICE, key=KEY, interval_s=0.05, seed=2) as device:
                await until(lambda: len(got.batches) >= 4, "four measurements")
                device.send_bad_mic()
                device.send_replay(back=2)
                device.send_plaintext()
                await until(lambda: counters(driver)["unencrypted_rejected"] == 1, "the faults")
                before = len(got.batches)
                await until(lambda: len(got.batches) >= before + 2, "readings after the faults")
                device.set_silent(True)
                sent = len(device.sent_plain)
                await until(lambda: counters(driver)["measurements"] == sent, "the last one")
        return device

    device = asyncio.run(scenario())
    assert_contiguous(got.records(), device.sent_plain)  # nothing from the forged packets
    seen = counters(driver)
    assert seen["bad_mic"] == 1
    assert seen["replays"] == 1
    assert seen["unencrypted_rejected"] == 1
    assert seen["encrypted_without_key"] == 0


@pytest.mark.integration
def test_encrypted_packets_without_a_key_are_counted_and_explained(bluez: MockBlueZ) -> None:
    driver = make_driver(silence_timeout_s=1)

    async def scenario() -> None:
        async with running(driver, Batches(), "bthome-no-key"):
            with BTHomeEmulator(bluez, DEVICE, key=KEY, interval_s=0.05, seed=3):
                await until(lambda: counters(driver)["encrypted_without_key"] >= 3, "packets")
                assert not driver.state().available
                # the reason, and after the silence timeout still inside the reason
                assert "encrypted packet but no key is configured" in driver.state().reason
                await until(lambda: "no valid" in driver.state().reason, "the silence timeout")
                assert driver.state().reason == (
                    "no valid advertisement for 1 s"
                    " (last rejected: encrypted packet but no key is configured for it)"
                )

    asyncio.run(scenario())
    assert counters(driver)["measurements"] == 0


@pytest.mark.integration
def test_a_wrong_key_fails_every_mic_and_publishes_nothing(bluez: MockBlueZ) -> None:
    got = Batches()
    driver = make_driver(key=WRONG_KEY.hex())

    async def scenario() -> None:
        async with running(driver, got, "bthome-wrong-key"):
            with BTHomeEmulator(bluez, DEVICE, key=KEY, interval_s=0.05, seed=4):
                await until(lambda: counters(driver)["bad_mic"] >= 3, "MIC failures")
                assert driver.state().reason.startswith("bad MIC")

    asyncio.run(scenario())
    assert got.batches == []


@pytest.mark.integration
def test_a_removed_device_turns_unavailable_but_a_trigger_based_one_does_not(
    bluez: MockBlueZ,
) -> None:
    regular = make_driver(silence_timeout_s=1)
    triggered = FAMILY.create(
        "button_1", FAMILY.parse_options("button_1", {"address": OTHER, "silence_timeout_s": 1})
    )

    async def scenario() -> None:
        async with (
            running(regular, Batches(), "bthome-regular"),
            running(triggered, Batches(), "bthome-trigger"),
        ):
            with (
                BTHomeEmulator(bluez, DEVICE, interval_s=0.05, seed=5) as device,
                BTHomeEmulator(bluez, OTHER, interval_s=0.05, seed=6, trigger=True) as button,
            ):
                await until(
                    lambda: regular.state().available and triggered.state().available, "both"
                )
                device.remove()
                button.remove()
                await until(lambda: not regular.state().available, "the silence")
                assert regular.state().reason == "no valid advertisement for 1 s"
                await asyncio.sleep(0.5)  # well past the button's own timeout by now
                assert triggered.state().available
                device.restore()
                await until(lambda: regular.state().available, "the device to come back")

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_device_not_in_the_config_is_reported_to_the_unknown_hook(bluez: MockBlueZ) -> None:
    reports: list[tuple[str, str, int]] = []
    previous = set_unknown_listener(lambda *report: reports.append(report))
    driver = make_driver()

    async def scenario() -> None:
        async with running(driver, Batches(), "bthome-unknown"):
            with (
                BTHomeEmulator(bluez, DEVICE, interval_s=0.05, seed=7),
                BTHomeEmulator(bluez, OTHER, interval_s=0.05, seed=8),
            ):
                await until(lambda: bool(reports) and driver.state().available, "the report")

    try:
        asyncio.run(scenario())
    finally:
        set_unknown_listener(previous)
    assert [(address, kind) for address, kind, _ in reports] == [(OTHER, "bthome")]


# -- the judgement without radio -------------------------------------------------------------


def test_a_device_restart_resets_the_counter_but_an_old_counter_is_a_replay() -> None:
    payloads = BTHomePayloads(DEVICE, KEY)

    def verdict(counter: int, packet_id: int) -> str:
        plain = codec.encode([(0x02, 20.0)], packet_id=packet_id)
        sealed = crypto.encrypt(plain, DEVICE, KEY, counter)
        return payloads.judge(Advertisement(DEVICE, -70, {}, {BTHOME_UUID: sealed})).kind

    assert verdict(5000, 1) == "new"
    assert verdict(4999, 2) == "rejected"  # older: a replay
    assert verdict(5000, 3) == "rejected"  # same counter, other bytes: a replay too
    assert verdict(3, 4) == "new"  # below 100 after 5000: the device restarted
    assert verdict(3, 5) == "rejected"  # ... but only once
    assert verdict(4, 6) == "new"
    assert payloads.counters()["replays"] == 3


# -- options and decode --------------------------------------------------------------------------


def test_sample_config_is_accepted() -> None:
    table = tomllib.loads(SAMPLE.read_text())["sensors"]
    for sensor_id, entry in table.items():
        assert entry["driver"] == "bthome"
        assert isinstance(family("bthome").parse_options(sensor_id, entry), BTHomeOptions)


def test_options_are_normalised_and_defaulted() -> None:
    options = FAMILY.parse_options("c", {"address": DEVICE.lower(), "key": KEY_HEX.upper()})
    assert options == BTHomeOptions(address=DEVICE, key=KEY, silence_timeout_s=300.0)
    assert isinstance(FAMILY.create("c", options), BTHomeDriver)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({}, "address"),
        ({"address": "54:48:E6:8F:80"}, "address"),
        ({"address": DEVICE, "key": "231d39c1"}, "key"),
        ({"address": DEVICE, "key": "zz" * 16}, "key"),
        ({"address": DEVICE, "key": 12}, "key"),
        ({"address": DEVICE, "silence_timeout_s": -1}, "silence_timeout_s"),
        ({"address": DEVICE, "bindkey": KEY_HEX}, "bindkey"),
    ],
)
def test_option_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(OptionError) as caught:
        FAMILY.parse_options("c", {"driver": "bthome", **table})
    assert caught.value.key == key


def test_decode_needs_mac_and_key_for_encrypted_packets_only() -> None:
    sealed = bytes.fromhex("41A47266C95F730011223378237214")
    with pytest.raises(ValueError, match="--mac and --key are needed"):
        FAMILY.decode(sealed, {"mac": DEVICE})
    opened = FAMILY.decode(sealed, {"mac": DEVICE, "key": KEY_HEX})
    assert opened.records == [("temperature", "Cel", 25.06), ("humidity", "%RH", 50.55)]
    with pytest.raises(crypto.BTHomeBadMic):
        FAMILY.decode(sealed, {"mac": DEVICE, "key": WRONG_KEY.hex()})
    whole = bytes.fromhex("0201060B094449592D73656E736F720A16D2FC4002C40903BF13")
    assert FAMILY.decode(whole, {}).records == [
        ("temperature", "Cel", 25.0),
        ("humidity", "%RH", 50.55),
    ]
    only_id = FAMILY.decode(codec.encode([], packet_id=9), {})
    assert only_id.records == []
    assert "packet id" in only_id.note


@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_any_service_data_gets_a_verdict_never_an_exception(
    packets: list[bytes], keyed: bool
) -> None:
    judge = BTHomePayloads(DEVICE, KEY if keyed else None)
    for data in packets:
        verdict = judge.judge(Advertisement(DEVICE, -70, {}, {BTHOME_UUID: data}))
        assert verdict.kind in {"new", "repeat", "rejected"}
        assert (verdict.kind == "rejected") == bool(verdict.reason)


@given(st.binary(max_size=48), st.booleans())
def test_family_decode_gives_records_or_a_value_error(data: bytes, with_key: bool) -> None:
    params = {"mac": DEVICE, "key": KEY_HEX} if with_key else {}
    try:
        decoded = FAMILY.decode(data, params)
    except ValueError as exc:
        outcome = str(exc)
    else:
        outcome = "records" if decoded.records else decoded.note
    assert outcome.strip()  # records, a note saying why there are none, or a reason
