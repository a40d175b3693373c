"""The wall clock is never trusted blindly: trust floor, jumps, flagged times, early certificates.

Unit tests drive `WallClock` with injected clocks. The integration test runs
the real agent under libfaketime: its wall clock starts in 1973 and is set
right while it runs, as NTP does on a gateway without RTC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.clock import (
    BUILD_FLOOR,
    JUMPED,
    TRUSTED,
    UNTRUSTED,
    ClockChange,
    Moment,
    WallClock,
    boottime,
    trust_floor,
)
from agent.envelope import Record, TrustedKey, encode_senml, open_sealed, seal, signer_for
from agent.identity import IdentityError, load_identity
from agent.verify import reading_lines
from drivers.base import TIME_BEFORE, Reading
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import Capture, capture, new_capture, write_config

REAL = 1_790_000_000.0  # 2026-09-21: a time the clock is right at


@dataclass
class Clocks:
    """A wall clock someone can set, and a boot clock that only moves forward."""

    wall: float
    boot: float = 10.0

    def clock(self, floor: float = BUILD_FLOOR) -> WallClock:
        return WallClock(floor, wall=lambda: self.wall, boot=lambda: self.boot)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds


# --- the trust rule ---------------------------------------------------------------------


def test_clock_booted_at_1970_becomes_trusted_when_ntp_sets_it() -> None:
    clocks = Clocks(wall=10.0)  # no RTC: the wall clock starts at the epoch with the boot
    clock = clocks.clock()
    assert not clock.trusted()
    assert clock.check() is None
    clocks.advance(30.0)
    assert clock.check() is None  # time passing is no change
    clocks.wall = REAL  # NTP steps the clock
    change = clock.check()
    assert change == ClockChange(TRUSTED, REAL - clocks.boot, REAL - clocks.boot)
    assert clock.trusted()
    assert clock.boot_wall_start() == REAL - 40.0
    assert clock.check() is None


@pytest.mark.parametrize("step", [3600.0, -3600.0, 2.5, -2.5])
def test_a_jump_of_a_trusted_clock_is_reported_with_its_size(step: float) -> None:
    clocks = Clocks(wall=REAL)
    clock = clocks.clock()
    clocks.advance(1.0)
    clocks.wall += step
    change = clock.check()
    assert change is not None
    assert change == ClockChange(JUMPED, REAL + step - 10.0, step)
    clocks.advance(1.0)
    assert clock.check() is None


def test_a_slewing_clock_is_never_a_jump() -> None:
    clocks = Clocks(wall=REAL)
    clock = clocks.clock()
    for _ in range(100):
        clocks.advance(1.0)
        clocks.wall += 0.5  # far more than NTP ever slews; still below the threshold per check
        assert clock.check() is None


def test_a_clock_set_back_below_the_floor_becomes_untrusted() -> None:
    clocks = Clocks(wall=REAL)
    clock = clocks.clock()
    clocks.wall = 86400.0
    change = clock.check()
    assert change is not None
    assert change.kind == UNTRUSTED
    assert change.step_s == pytest.approx(86400.0 - REAL)
    assert not clock.trusted()


@given(wall=st.floats(min_value=0, max_value=4e9), not_before=st.integers(0, 4 * 10**9))
def test_the_clock_is_never_trusted_below_the_build_floor_or_the_certificate_start(
    wall: float, not_before: int
) -> None:
    floor = trust_floor(datetime.fromtimestamp(not_before, UTC))
    assert floor == max(BUILD_FLOOR, not_before)
    clock = Clocks(wall=wall).clock(floor)
    assert clock.trusted() == (wall >= floor)
    assert clock.trusted() == (wall >= BUILD_FLOOR and wall >= not_before)


def test_the_build_floor_is_2026_and_the_default() -> None:
    assert datetime.fromtimestamp(BUILD_FLOOR, UTC) == datetime(2026, 1, 1, tzinfo=UTC)
    assert trust_floor() == BUILD_FLOOR
    assert WallClock().floor == BUILD_FLOOR


def test_the_offset_seen_while_untrusted_is_remembered_after_the_clock_is_set() -> None:
    clocks = Clocks(wall=REAL)
    clock = clocks.clock()
    assert clock.untrusted_offset() is None  # never below the floor
    clocks.wall = 500.0
    assert clock.untrusted_offset() == 490.0
    clocks.wall = REAL
    assert clock.untrusted_offset() == 490.0


def test_a_moment_of_an_unset_clock_is_dated_once_the_clock_is_set() -> None:
    clocks = Clocks(wall=500.0)
    clock = clocks.clock()
    early = clock.moment()
    assert early == Moment(clocks.boot, False)  # boot time: the wall clock cannot be believed
    assert clock.date(early) is None
    clocks.advance(30.0)
    clocks.wall = REAL  # NTP sets the clock 30 s later
    assert clock.date(early) == REAL - 30.0
    assert clock.moment() == Moment(REAL, True)


def test_a_moment_of_a_trusted_clock_keeps_its_wall_time_through_later_jumps() -> None:
    clocks = Clocks(wall=REAL)
    clock = clocks.clock()
    moment = clock.moment()
    clocks.wall -= 3600.0
    assert clock.date(moment) == REAL


def test_the_real_clocks_give_a_boot_start_in_the_past() -> None:
    clock = WallClock()
    assert boottime() > 0
    assert clock.boot_wall_start() < datetime.now(UTC).timestamp()


# --- flagged times on the wire ------------------------------------------------------------


def test_verify_prints_the_flag_of_a_reading_from_before_a_boot() -> None:
    key = Ed25519PrivateKey.generate()
    signer = signer_for(key)
    readings = [
        Reading("air_1", "pm2_5", 7.0, "ug/m3", REAL, TIME_BEFORE),
        Reading("air_1", "pm10", 9.0, "ug/m3", REAL + 5),
    ]
    topic = "citygate/gw-a/telemetry"
    message = seal(
        encode_senml("gw-a", readings), signer=signer, gateway_id="gw-a", seq=1, iat=1, topic=topic
    )
    opened = open_sealed(message, topic, {signer.kid: TrustedKey("gw-a", key.public_key())})
    lines = [json.loads(line) for line in reading_lines(opened)]
    assert (lines[0]["tq"], lines[0]["t"]) == ("before", REAL)
    assert "tq" not in lines[1]
    assert cbor2.loads(cbor2.loads(message).value[2])[0]["tq_"] == "before"


# --- identity under an untrusted clock ------------------------------------------------------


def test_certificate_not_valid_yet_starts_the_agent_with_a_warning_when_early_clock_ok(
    lab: LabFiles, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = lab.clients["gw-a"]
    booted_without_rtc = datetime(1970, 1, 1, 0, 0, 42, tzinfo=UTC)
    with pytest.raises(IdentityError, match="not valid yet"):
        load_identity(key, cert, lab.ca_cert, now=booted_without_rtc)
    with caplog.at_level(logging.WARNING, logger="agent.identity"):
        identity = load_identity(
            key, cert, lab.ca_cert, now=booted_without_rtc, early_clock_ok=True
        )
    assert identity.gateway_id == "gw-a"
    assert "clock looks wrong" in caplog.text
    assert len(caplog.records) == 1  # one warning, not one per certificate of the chain
    assert "1970-01-01 00:00:42" in caplog.text


def test_expired_certificate_is_refused_even_when_early_clock_ok(lab: LabFiles) -> None:
    cert, key = lab.clients["gw-a"]
    later = load_identity(key, cert, lab.ca_cert).not_after + timedelta(seconds=1)
    with pytest.raises(IdentityError, match="expired"):
        load_identity(key, cert, lab.ca_cert, now=later, early_clock_ok=True)


# --- the real agent under libfaketime -----------------------------------------------------

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def _faked_clock_env(clock_file: Path) -> dict[str, str]:
    """libfaketime fakes the wall clock (OpenSSL's too) from a file read at every call;
    CLOCK_MONOTONIC and CLOCK_BOOTTIME stay real, as they are when NTP sets a clock."""
    return {
        **os.environ,
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(clock_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


async def _until(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


def _records(out: Capture) -> list[Record]:
    """Every record of every message, each message once (by gateway and seq)."""
    unique = {(message.gateway_id, message.seq): message for message in out.messages}
    return [record for message in unique.values() for record in message.records]


@pytest.mark.integration
@pytest.mark.skipif(not FAKETIME.exists(), reason="needs Debian's libfaketime")
def test_agent_booted_in_1973_sends_every_reading_with_its_real_time_once_ntp_sets_the_clock(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    clock_file = tmp_path / "faketime"
    clock_file.write_text("-1700000000\n")  # the agent's wall clock reads 1973
    out = new_capture(lab, ["gw-a"])
    log_path = tmp_path / "agent.log"
    # Not a timing assertion: a reading's time must lie within the test's run, by the real
    # clock (the test process is not faked), instead of in 1973.
    began = time.time()
    produced: list[int] = []
    exit_codes: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        with Pms5003Emulator(period_s=0.1, seed=7, wait_for_host=True) as sensor:
            config = write_config(tmp_path, lab, broker.port, {"air_1": sensor.port})
            with log_path.open("ab") as log:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agent.cli", "run", "--config", str(config),
                    stdout=log, stderr=log, env=_faked_clock_env(clock_file),
                )  # fmt: skip
            try:
                await _until(
                    lambda: sensor.frames_sent >= 15 or agent.returncode is not None,
                    20,
                    "frames under the 1973 clock",
                )
                assert agent.returncode is None, "the agent did not start under a 1973 clock"
                assert out.messages == []
                clock_file.write_text("+0\n")  # NTP sets the clock
                await _until(lambda: sensor.frames_sent >= 30, 20, "frames under the set clock")
                sensor.set_silent(True)
                await asyncio.sleep(0.5)  # the agent reads what is still in the pty
                produced.append(sensor.frames_sent * 3)
                await _until(lambda: len(_records(out)) >= produced[0], 20, "every reading")
            finally:
                if agent.returncode is None:
                    agent.send_signal(signal.SIGTERM)
                exit_codes.append(await agent.wait())
                stop.set()
                await watcher

    try:
        asyncio.run(scenario())
    finally:
        log_text = log_path.read_text(errors="replace")
        print(log_text[-4000:])  # shown by pytest when the test fails
    ended = time.time()
    assert exit_codes == [0]
    assert out.failures == []
    assert "clock looks wrong" in log_text
    records = _records(out)
    assert len(records) == produced[0]
    assert all(began - 1.0 <= record.t <= ended + 1.0 for record in records)
    assert all(record.time_quality == "" for record in records)
