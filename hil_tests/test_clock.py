"""Clock faults: readings are never stamped 1970, and a jumping clock moves neither seq nor polls.

The agent runs under libfaketime (`rig.clock()`): its wall clock (OpenSSL's
too) reads what the scenario says, while its monotonic clocks and
CLOCK_BOOTTIME stay real, as on a gateway whose clock NTP sets or steps. The
test process itself is not faked, so "the real time" below is its clock.

- Booted in 1970: the agent reads its sensors but cannot connect (the broker's
  certificate is not valid yet by its clock); the spool holds the readings with
  boot-relative times. Once the clock is set, every reading arrives with its
  real time (the held ones exactly at boot start + boot time), a
  `clock_synced` event says how far the clock moved, and nothing signed
  carries a time before the run began. An event raised in 1970 (a sensor
  falling silent) must arrive with its real time too.
- Stepped -3600 s and +3600 s while connected: seq keeps increasing on the
  wire while the messages' `iat` goes back, each step is a `clock_jumped`
  event with its size, and every sensor delivers samples at the rate it had
  before the steps (a scheduler on the wall clock would stall for an hour
  after a backward step, or burst after a forward one).
- A power cut while the clock still reads 1970, and a restart once it is set:
  in the same boot the held readings arrive with their real times. After a
  reboot they arrive flagged `tq_: "before"`, each once, dated no later than
  this boot's start, with distinct times in the order they were taken. A test
  cannot reboot its host: it changes the boot id the spool recorded with the
  readings, which is how the agent tells a reboot.

tests/test_clock.py covers the trust rule itself and one agent under
libfaketime without a rig.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.clock import BUILD_FLOOR
from agent.envelope import Record
from drivers.base import TIME_UNSYNCED
from hil_tests.observe import Arrival, Observer, SignedPack, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec

pytestmark = pytest.mark.integration

#: the jump scenario's clock starts this far ahead, then steps back and forth: backward
#: first (a scheduler on the wall clock would stall at once), never below the gateway
#: certificate's start (a step below it is the 1970 case, not a jump)
AHEAD_S = 3600
SHORT_STEPS = (-3600, 3600, -3600, 3600)
LONG_STEPS = SHORT_STEPS * 40
#: how long each sensor's sample rate is measured before the steps, and at least while they go
WINDOW_S = 5.0
#: after a power cut or reboot, how closely a held reading's corrected time must match the
#: real time it was taken at (both sides read the same CLOCK_BOOTTIME and wall clock)
TIME_MATCH_S = 0.05
#: how far a sample rate may drift while the clock jumps: a scheduler on the wall clock is
#: off by orders of magnitude (an hour-long stall, or thousands of catch-up polls)
RATE_BAND = (0.5, 2.0)


@dataclass(frozen=True)
class Held:
    """A reading the spool holds for its time: boot-relative `t`, as the spool file has it."""

    sensor: str
    quantity: str
    value: float
    t: float


def held_readings(spool: Path) -> list[Held]:
    """The spool file's TIME_UNSYNCED readings (read-only; none before the file exists)."""
    if not spool.exists():
        return []
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT c.sensor, c.quantity, r.value, r.t FROM readings r "
            "JOIN channels c ON c.id = r.channel WHERE r.tq = ?",
            (TIME_UNSYNCED,),
        ).fetchall()
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return []
    finally:
        db.close()
    return [Held(str(s), str(q), float(v), float(t)) for s, q, v, t in rows]


def pretend_another_boot(spool: Path) -> None:
    """What a reboot changes for a stopped agent's spool: the kernel boot id no longer matches
    the one the spool recorded with its held readings (CLOCK_BOOTTIME restarting is the
    other change: it is why those readings can no longer be dated)."""
    db = sqlite3.connect(spool)
    try:
        with db:
            changed = db.execute(
                "UPDATE meta SET value = ? WHERE key = 'boot_id'", (str(uuid.uuid4()),)
            ).rowcount
    finally:
        db.close()
    assert changed == 1, "the spool recorded no boot id with its held readings"


def boot_wall_start() -> float:
    """The wall-clock time at which this boot began (the test's clock is the real one)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def records(observer: Observer) -> list[Record]:
    """Every reading that reached the observer, each message counted once."""
    return [r for m in observer.telemetry().values() for r in m.records]


def events(observer: Observer, kind: str) -> list[dict[str, float | str | bool]]:
    """The agent's events of `kind`, in arrival order, as {record name: value}."""
    return [
        pack.subjects()["agent"]
        for pack in observer.events()
        if pack.value("agent", "event") == kind
    ]


def unmatched(
    held: Sequence[Held], arrived: Iterable[Record], expected: Callable[[Held], float]
) -> list[Held]:
    """The held readings with no arrived record of the same sensor, quantity and value
    within TIME_MATCH_S of the time `expected` gives for it; each record matches once."""
    times: dict[tuple[str, str, float], list[float]] = {}
    for record in arrived:
        if isinstance(record.v, int | float) and not isinstance(record.v, bool):
            times.setdefault((record.sensor, record.n, float(record.v)), []).append(record.t)
    missing: list[Held] = []
    for reading in held:
        candidates = times.get((reading.sensor, reading.quantity, reading.value), [])
        want = expected(reading)
        found = next((t for t in candidates if abs(t - want) <= TIME_MATCH_S), None)
        if found is None:
            missing.append(reading)
        else:
            candidates.remove(found)
    return missing


def first_arrivals(observer: Observer, kind: str) -> list[Arrival]:
    """The verified messages on `kind`, the first copy of each seq, in arrival order."""
    seen: set[int] = set()
    found: list[Arrival] = []
    for arrival in observer.arrivals:
        message = arrival.message
        if arrival.kind == kind and message is not None and message.seq not in seen:
            seen.add(message.seq)
            found.append(arrival)
    return found


def signed_times(observer: Observer) -> list[float]:
    """The record times of every verified health report and event."""
    return [r.t for kind in ("health", "events") for p in observer.packs(kind) for r in p.records]


async def all_accepted(observer: Observer, accepted: object, earlier: int = 0) -> None:
    """Wait until the observer holds the `accepted` readings of a clean stop (plus `earlier`
    ones of a run that was killed)."""
    assert isinstance(accepted, int)
    await wait_until(
        lambda: observer.readings_total() >= accepted + earlier,
        timeout_s=15.0,
        what=f"{accepted} + {earlier} readings at the observer",
    )
    assert observer.readings_total() == accepted + earlier


async def held_from_every_sensor(rig: Rig) -> None:
    """Wait until the spool holds readings of every sensor of the rig for their time."""
    sensors = set(rig.sensors)
    await wait_until(
        lambda: {h.sensor for h in held_readings(rig.spool_path)} >= sensors,
        timeout_s=rig.spec.first_reading_s,
        what=f"held readings of every sensor ({sorted(sensors)})",
    )


def assert_clean(observer: Observer) -> None:
    """Every message verified, and copies of one seq byte-identical. (That no reading came
    twice under a new seq is the exact count of `all_accepted`; Observer.repeated_readings
    cannot tell that from two frames a driver read in one go and stamped in one millisecond.)
    """
    assert observer.failures == []
    assert observer.differing_duplicates() == []


# -- booted in 1970 ------------------------------------------------------------------------


def test_readings_of_a_clock_still_in_1970_arrive_with_their_real_times_once_it_is_set(
    rig_spec: RigSpec, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("clock")
            observer = rig.observer
            clock = rig.clock()
            clock.boot_in_1970()
            began = time.time()
            await rig.start_agent(env=clock.environment())
            await held_from_every_sensor(rig)
            await wait_until(
                lambda: rig.proxy.connections >= 2,
                timeout_s=15.0,
                what="two connection attempts of the agent",
            )
            held = held_readings(rig.spool_path)
            assert observer.arrivals == [], "the agent reached the broker with a 1970 clock"
            assert "certificate is not yet valid" in rig.agent_log()  # by its clock: TLS says no
            offset_1970 = clock.offset_s
            set_at = time.time()
            clock.real()
            await wait_until(
                lambda: bool(events(observer, "clock_synced")),
                timeout_s=15.0,
                what="a clock_synced event",
            )
            run = await rig.stop_agent()
            ended = time.time()
            assert run.returncode == 0, rig.agent_log()
            assert run.summary is not None
            await all_accepted(observer, run.summary["accepted"])

            assert_clean(observer)
            arrived = records(observer)
            print(f"{len(held)} readings held in 1970, {len(arrived)} delivered")
            start = boot_wall_start()
            assert unmatched(held, arrived, lambda h: h.t + start) == []
            assert all(began - 1.0 <= r.t <= ended + 1.0 for r in arrived)
            assert {r.time_quality for r in arrived} == {""}
            assert set(observer.readings_by_sensor()) == set(rig.sensors)
            sealed = [a.message.iat for a in first_arrivals(observer, "telemetry") if a.message]
            assert all(int(set_at) - 1 <= iat <= ended + 1 for iat in sealed)
            assert all(began - 1.0 <= t <= ended + 1.0 for t in signed_times(observer))
            (synced,) = events(observer, "clock_synced")
            step = synced["step_s"]
            assert isinstance(step, float | int)
            assert abs(step + offset_1970) <= 2.0, (step, offset_1970)
            assert observer.statuses()[0].get("state") == "online"

    asyncio.run(scenario())


def test_an_event_raised_while_the_clock_reads_1970_arrives_with_its_real_time(
    rig_spec: RigSpec, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("clock")
            # a Modbus device that stops answering is a sensor fault within a second or two
            sensor = next((s for s, b in rig.sensors.items() if b.spec.family == "modbus"), "")
            if not sensor:
                pytest.skip(f"rig {rig_spec.name} has no Modbus sensor to fall silent")
            rig.require("silence", sensor=sensor)
            observer = rig.observer
            clock = rig.clock()
            clock.boot_in_1970()
            began = time.time()
            await rig.start_agent(env=clock.environment())
            await wait_until(
                lambda: any(h.sensor == sensor for h in held_readings(rig.spool_path)),
                timeout_s=rig_spec.first_reading_s,
                what=f"held readings of {sensor}",
            )
            rig.faults(sensor).silence(True)
            await wait_until(
                lambda: f"{sensor}: sensor_fault" in rig.agent_log(),
                timeout_s=15.0,
                what=f"the agent's sensor_fault for {sensor} (in its log)",
            )
            clock.real()

            def faults() -> list[SignedPack]:
                return [p for p in observer.events() if p.value(sensor, "event") == "sensor_fault"]

            await wait_until(
                lambda: bool(faults()), timeout_s=15.0, what=f"the sensor_fault of {sensor}"
            )
            run = await rig.stop_agent()
            ended = time.time()
            assert run.returncode == 0, rig.agent_log()
            (fault,) = faults()
            print(
                f"sensor_fault dated {min(r.t for r in fault.records):.0f} (run began {began:.0f})"
            )
            assert all(began - 1.0 <= r.t <= ended + 1.0 for r in fault.records)

    asyncio.run(scenario())


# -- steps of a trusted clock ----------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [SHORT_STEPS, pytest.param(LONG_STEPS, marks=[pytest.mark.long, pytest.mark.timeout(1800)])],
    ids=["short", "long"],
)
def test_clock_steps_while_connected_move_neither_seq_nor_the_sampling(
    rig_spec: RigSpec, tmp_path: Path, steps: Sequence[int]
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("clock")
            observer = rig.observer
            clock = rig.clock()
            clock.set_offset(AHEAD_S)
            began = time.time()
            await rig.start_agent(env=clock.environment())
            await wait_until(
                lambda: min(messages_per_sensor(rig).values()) >= 2,
                timeout_s=rig_spec.first_reading_s,
                what="readings of every sensor in two messages",
            )
            calm_from = time.time()
            await asyncio.sleep(WINDOW_S)
            steps_from = time.time()
            for done, step in enumerate(steps, 1):
                clock.set_offset(clock.offset_s + step)
                await jump_events(observer, done, f"clock_jumped event {done} ({step:+d} s)")
            await asyncio.sleep(max(0.0, steps_from + WINDOW_S - time.time()))
            steps_to = time.time()
            run = await rig.stop_agent()
            assert run.returncode == 0, rig.agent_log()
            assert run.summary is not None
            await all_accepted(observer, run.summary["accepted"])
            ended = time.time()

            assert_clean(observer)
            jumped = [e["step_s"] for e in events(observer, "clock_jumped")]
            assert len(jumped) == len(steps), jumped
            assert all(
                isinstance(seen, float | int) and abs(seen - step) <= 2.0
                for seen, step in zip(jumped, steps, strict=True)
            ), jumped
            assert events(observer, "clock_unsynced") == []

            telemetry = [a.message for a in first_arrivals(observer, "telemetry") if a.message]
            seqs = [m.seq for m in telemetry]
            assert all(a < b for a, b in itertools.pairwise(seqs)), seqs
            assert any(b.iat <= a.iat - 3000 for a, b in itertools.pairwise(telemetry))
            assert_one_message_per_seq(observer)

            offsets = {AHEAD_S + sum(steps[:n]) for n in range(len(steps) + 1)}
            taken = sample_times(records(observer), offsets, began, ended)
            calm = per_sensor(taken, calm_from, steps_from)
            stepping = per_sensor(taken, steps_from, steps_to)
            calm_s, stepping_s = steps_from - calm_from, steps_to - steps_from
            ratios: dict[str, float] = {}
            for sensor in rig.sensors:
                assert calm[sensor] > 0, f"{sensor}: no samples before the steps"
                ratios[sensor] = (stepping[sensor] / stepping_s) / (calm[sensor] / calm_s)
                print(
                    f"{sensor}: {calm[sensor] / calm_s:.2f} samples/s before the steps, "
                    f"{stepping[sensor] / stepping_s:.2f} while stepping ({len(steps)} steps "
                    f"in {stepping_s:.1f} s)"
                )
            low, high = RATE_BAND
            assert all(low <= ratio <= high for ratio in ratios.values()), ratios

    asyncio.run(scenario())


def messages_per_sensor(rig: Rig) -> dict[str, int]:
    found = dict.fromkeys(rig.sensors, 0)
    for message in rig.observer.telemetry().values():
        for sensor in {r.sensor for r in message.records} & found.keys():
            found[sensor] += 1
    return found


def sample_times(
    arrived: Iterable[Record], offsets: set[int], began: float, ended: float
) -> set[tuple[str, float]]:
    """(sensor, real time) of every sample: each reading's time minus the clock offset under
    which it was stamped, the one offset that puts it within the run (offsets are further
    apart than the run is long, so there is exactly one)."""
    taken: set[tuple[str, float]] = set()
    for record in arrived:
        real = [record.t - o for o in offsets if began - 1.0 <= record.t - o <= ended + 1.0]
        assert len(real) == 1, f"{record}: not stamped under one of the offsets {offsets}"
        taken.add((record.sensor, real[0]))
    return taken


def per_sensor(taken: Iterable[tuple[str, float]], since: float, until: float) -> Counter[str]:
    return Counter(sensor for sensor, real in taken if since <= real < until)


async def jump_events(observer: Observer, count: int, what: str) -> None:
    await wait_until(
        lambda: len(events(observer, "clock_jumped")) >= count, timeout_s=10.0, what=what
    )


def assert_one_message_per_seq(observer: Observer) -> None:
    """A seq names one signed message across telemetry, health and events (copies of it are
    byte-identical)."""
    payloads: dict[int, set[bytes]] = {}
    for arrival in observer.arrivals:
        if arrival.message is not None:
            payloads.setdefault(arrival.message.seq, set()).add(arrival.payload)
    assert [seq for seq, copies in payloads.items() if len(copies) > 1] == []


# -- a power cut before the clock was set ------------------------------------------------------


@pytest.mark.parametrize(
    "reboot",
    [False, True],
    ids=["same-boot", "after-a-reboot"],
)
def test_readings_held_at_a_power_cut_in_1970_are_dated_in_the_same_boot_or_flagged_after_one(
    rig_spec: RigSpec, tmp_path: Path, reboot: bool
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("clock")
            rig.require("power")
            observer = rig.observer
            clock = rig.clock()
            clock.boot_in_1970()
            await rig.start_agent(env=clock.environment())
            await held_from_every_sensor(rig)
            await rig.kill_agent()
            held = held_readings(rig.spool_path)
            assert observer.arrivals == [], "the agent reached the broker with a 1970 clock"
            if reboot:
                pretend_another_boot(rig.spool_path)
            clock.real()
            await rig.start_agent(env=clock.environment())
            start = boot_wall_start()
            await wait_until(
                lambda: (
                    len(flagged(observer)) >= len(held)
                    if reboot
                    else not unmatched(held, records(observer), lambda h: h.t + start)
                ),
                timeout_s=15.0,
                what=f"the {len(held)} readings held at the power cut",
            )
            run = await rig.stop_agent()
            assert run.returncode == 0, rig.agent_log()
            assert run.summary is not None
            await all_accepted(observer, run.summary["accepted"], earlier=len(held))

            print(f"{len(held)} readings held at the power cut, {len(flagged(observer))} flagged")
            arrived = records(observer)
            assert {r.time_quality for r in arrived} <= {"", "before"}
            assert all(r.t >= BUILD_FLOOR for r in arrived)
            assert all(t >= BUILD_FLOOR for t in signed_times(observer))
            if reboot:
                assert_flagged_before_this_boot(held, flagged(observer), start)
            else:
                assert flagged(observer) == []
            assert_clean(observer)

    asyncio.run(scenario())


def flagged(observer: Observer) -> list[Record]:
    """The readings that arrived flagged as taken before their time (`tq_: "before"`)."""
    return [r for r in records(observer) if r.time_quality == "before"]


def assert_flagged_before_this_boot(
    held: Sequence[Held], found: Sequence[Record], start: float
) -> None:
    """The held readings of an earlier boot arrived flagged, each once, dated no later than
    this boot's start; each sensor's readings keep as many distinct times as they were taken
    at, in the order taken."""
    assert Counter((h.sensor, h.quantity, h.value) for h in held) == Counter(
        (r.sensor, r.n, float(r.v)) for r in found if isinstance(r.v, int | float)
    )
    assert all(BUILD_FLOOR <= r.t <= start + TIME_MATCH_S for r in found)
    for channel in {(h.sensor, h.quantity) for h in held}:
        taken = sorted((h.t, h.value) for h in held if (h.sensor, h.quantity) == channel)
        dated = sorted(
            (r.t, float(r.v))
            for r in found
            if (r.sensor, r.n) == channel and isinstance(r.v, int | float)
        )
        times = {t for t, _ in dated}
        assert len(times) == len({t for t, _ in taken}), f"{channel}: times merged: {times}"
        assert [v for _, v in dated] == [v for _, v in taken], f"{channel}: order lost"
