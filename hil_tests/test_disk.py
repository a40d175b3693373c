"""Guarantee 3: a spool over its byte budget, and a full disk, seen from outside the agent.

Budget. With the broker stopped from before the first reading, six sensors
streaming (rigs/fast.toml), one reading per message and the smallest budget
(1 MiB), the spool goes over its budget within seconds and must drop the
oldest data. The sensors then fall quiet and the broker comes back: the
agent must still be the process that was started; its signed health must
count the drops; every reading it accepted must have reached the broker or
be counted as dropped, exactly; per sensor, the readings that arrived must
be one unbroken run of the frames its emulator sent, ending with the newest
and not starting with the first (the oldest went, nothing in between); and
no health report may show the spool over its budget by more than a page.

A second outage ends with one sensor still streaming, so that new readings
push the oldest rows out of the full spool while the sender is sending those
same rows: the count must stay exact (a row dropped in flight and then
acknowledged was delivered, not lost). A third measures the spool's files on
disk (database, write-ahead log and its index) against the budget.

Disk full. The spool sits on a small disk of its own (a tmpfs as root). The
disk is filled while the agent runs: a signed `disk_full` event must arrive
while it is full, health reports must go on (saying `disk_full`), readings
must wait in memory up to `spool.memory_max_readings` (beyond it the oldest
are dropped and counted as `dropped_memory`), and the spool must not change.
When the disk is freed: a `disk_ok` event, the readings held in memory
arrive, everything the spool had committed before the disk filled arrives
byte for byte, no sequence number is used for two messages, and after a
clean stop the spool passes `PRAGMA integrity_check` with every accepted
reading received or counted as dropped in memory.

The short variants run in `make test`; with `--long` the budget outage lasts
minutes (some 100 000 readings dropped), and the disk is filled and freed
again and again over several runs of the agent, on a tmpfs and with the
file-size limit that stands in for it without root.

The spool file is read (read-only) only to pace the scenarios and to learn
what was committed before the disk filled; every verdict comes from what
reached the broker, the health and events the agent signed, its exit status,
its last-run.json, and the size of its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.pms5003.emulator import Pms5003Emulator
from hil_tests.faults import Disk
from hil_tests.observe import Observer, SignedPack, wait_until
from hil_tests.rig import AgentRun, Rig
from hil_tests.rigfile import RigSpec, load_rig
from tests.agentrig import read_spool

pytestmark = pytest.mark.integration

MIB = 1 << 20
FAST_RIG = Path(__file__).resolve().parent / "rigs" / "fast.toml"
#: the PMS5003 records of one frame, in the order of the emulator's `sent_values`
PMS_RECORDS = ("pm1", "pm2_5", "pm10")

#: the smallest budget, one reading per message (each message costs a signature): the
#: spool fills in seconds; the backlog (about 4000 messages) drains in seconds
BUDGET_TUNING: Mapping[str, Mapping[str, object]] = {
    "spool": {"budget_bytes": MIB, "batch_max_readings": 1},
    "broker": {"backlog_messages_per_s": 500.0},
}
#: what the spool's files may take on disk beyond the budget: the write-ahead log between
#: checkpoints (a sixteenth of the budget), its index (32 KiB), and a few transactions' pages
FILES_SLACK = MIB // 16 + 96 * 1024
#: readings dropped by the budget before the broker comes back: a few hundred past the
#: budget, or with --long minutes of dropping (about 450 readings a second on the rig)
SHORT_DROPS, LONG_DROPS = 500, 100_000

#: the smallest memory buffer, so that a few seconds of full disk reach its bound (the
#: budget stays the default: the disk is filled by something else, not by the spool)
MEMORY_MAX = 100
DISK_TUNING: Mapping[str, Mapping[str, object]] = {"spool": {"memory_max_readings": MEMORY_MAX}}
#: the spool's own disk: room for the spool and its write-ahead log (the filler takes the rest)
DISK_SIZE = 8 * MIB
#: (runs of the agent, fill/free cycles per run, disk mode): one fill, or with --long
#: minutes of them over several runs (each run starts from the spool the last one left),
#: also with the file-size limit that stands in for a full disk without root. A run is
#: kept short: a full disk is noticed when the spool needs room, and SQLite's write-ahead
#: log, which a run starts afresh, grows for its first thousand pages (a minute or more
#: here) and then reuses its own blocks
SHORT_CYCLES, LONG_CYCLES, LONG_FSIZE_CYCLES = (1, 1, None), (10, 3, None), (4, 3, "fsize")
#: health reports (one a second) that must arrive while the disk is full
REPORTS_WHILE_FULL = 2


# -- the agent, seen from outside -------------------------------------------------------------


def _alive(rig: Rig, predicate: Callable[[], bool]) -> Callable[[], bool]:
    """`predicate`, for `wait_until`, failing at once if the agent has exited."""

    def check() -> bool:
        if not rig.agent_running:
            raise AssertionError(f"the agent exited; its log ends:\n{rig.agent_log()[-3000:]}")
        return predicate()

    return check


def _spool_counter(path: Path, key: str) -> int:
    """A counter from the spool's `meta` table, read-only (0 while there is none yet)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return 0
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return 0
    finally:
        db.close()
    return 0 if row is None else int(row[0])


@dataclass
class _Settled:
    """A `wait_until` predicate: the spool's outbox and readings have not changed for
    `for_s` seconds (what the agent had read is committed and packed)."""

    path: Path
    for_s: float
    _last: tuple[object, ...] = ()
    _since: float = 0.0

    def __call__(self) -> bool:
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
            try:
                current = db.execute(
                    "SELECT (SELECT max(seq) FROM outbox), (SELECT count(*) FROM readings)"
                ).fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return False
        now = time.monotonic()
        if current != self._last:
            self._last, self._since = current, now
            return False
        return now - self._since >= self.for_s


def _footprint(path: Path) -> int:
    """Bytes the spool takes on disk: the database, its write-ahead log and its index."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += path.with_name(path.name + suffix).stat().st_size
    return total


def _integrity(path: Path) -> tuple[str, int]:
    """`PRAGMA integrity_check` of a spool nobody has open, and its page size."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        checked = "; ".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    finally:
        db.close()
    return checked, int(page_size)


def _agent(pack: SignedPack, name: str) -> float | str | bool | None:
    return pack.value("agent", name)


def _count(pack: SignedPack, name: str) -> int:
    value = _agent(pack, name)
    assert not isinstance(value, bool), (name, value)
    assert isinstance(value, int | float), (name, value)
    return int(value)


def _events(observer: Observer, kind: str) -> list[SignedPack]:
    return [pack for pack in observer.events() if _agent(pack, "event") == kind]


def _seqs_reused(observer: Observer) -> list[int]:
    """Sequence numbers carried by two different signed messages (any topic)."""
    payloads: dict[int, set[bytes]] = {}
    for arrival in observer.arrivals:
        if arrival.message is not None:
            payloads.setdefault(arrival.message.seq, set()).add(arrival.payload)
    return sorted(seq for seq, found in payloads.items() if len(found) > 1)


def _summary_count(run: AgentRun, name: str) -> int:
    assert run.summary is not None, "a clean stop writes last-run.json"
    value = run.summary[name]
    assert isinstance(value, int), (name, value)
    return value


# -- which readings were dropped ------------------------------------------------------------


def _frames(observer: Observer, sensor: str) -> list[dict[str, float]]:
    """The PMS5003 frames of `sensor` that reached the broker, in the order the agent
    accepted them (the order of seq: the oldest readings are packed first). A frame's
    records come in `PMS_RECORDS` order; frames read in one burst may share a time stamp,
    so the order, not the time, tells them apart."""
    frames: list[dict[str, float]] = []
    for _, message in sorted(observer.telemetry().items()):
        for record in message.records:
            if record.sensor != sensor or not isinstance(record.v, int | float):
                continue
            if not frames or record.n in frames[-1]:
                frames.append({})
            frames[-1][record.n] = float(record.v)
    return frames


def _sent(emulator: Pms5003Emulator) -> tuple[list[tuple[int, int, int]], int]:
    """The frames the emulator still remembers, and how many it has forgotten before them."""
    while True:
        before = emulator.frames_sent
        sent = emulator.sent_values()
        if emulator.frames_sent == before:  # no frame went out while reading
            return sent, before - len(sent)


def unbroken_tail_problem(
    received: Sequence[Mapping[str, float]], sent: Sequence[tuple[int, int, int]], forgotten: int
) -> str | None:
    """None if the `received` frames are one unbroken run of the frames sent that does not
    begin with the first frame sent; otherwise what is wrong.

    `sent` are the frames an emulator remembers, oldest first, after `forgotten` older
    ones. The first received frame may lack records (its message dropped, and its other
    records' not); every later one must be whole. Frames older than `sent` cannot be
    checked: the run is then checked as far back as `sent` goes.
    """
    if not received:
        return "no frame was received"
    partial = [i for i, frame in enumerate(received[1:], 1) if len(frame) != len(PMS_RECORDS)]
    if partial:
        return f"frames with records missing after the first received one: {partial[:5]}"

    def same(frame: Mapping[str, float], values: tuple[int, int, int]) -> bool:
        return all(
            frame.get(name, value) == value for name, value in zip(PMS_RECORDS, values, strict=True)
        )

    for last in range(len(sent) - 1, -1, -1):
        checked = min(len(received), last + 1)
        if all(same(received[-1 - k], sent[last - k]) for k in range(checked)):
            first = forgotten + last - len(received) + 1  # counted from the first frame sent
            if first < 0:
                return f"{len(received)} frames received, more than the {last + 1} sent"
            if first == 0:
                return "the first frame sent was received: the budget dropped something newer"
            return None
    return (
        f"the {len(received)} frames received are no unbroken run of the {len(sent)} "
        "frames sent: a hole, or a frame out of order"
    )


# -- the budget -------------------------------------------------------------------------------


def _fast_rig(rig_spec: RigSpec) -> RigSpec:
    """The rig of the budget scenarios: rigs/fast.toml, unless the chosen rig is real."""
    if not rig_spec.emulated:
        pytest.skip(
            "the budget scenarios run on emulated sensors fast enough to fill a spool in "
            f"seconds ({FAST_RIG.name}), whose frames they know; rig {rig_spec.name} is real"
        )
    return load_rig(FAST_RIG)


@dataclass
class _Outage:
    """Figures of one outage past the budget, for the report of the scenario."""

    lasted_s: float = 0.0
    dropped_during: int = 0
    drained_in_s: float = 0.0
    footprint: int = 0  # the largest size of the spool's files seen during the outage


async def _outage_past_the_budget(rig: Rig, dropped_at_least: int) -> _Outage:
    """Start the agent with the broker stopped and wait until the budget has dropped
    `dropped_at_least` readings (the spool's own counter, read-only)."""
    rig.require("broker")
    rig.broker_control.stop()  # before the first reading: nothing leaves early
    await rig.start_agent()
    started = time.monotonic()
    outage = _Outage()

    def dropped_enough() -> bool:
        outage.footprint = max(outage.footprint, _footprint(rig.spool_path))
        outage.dropped_during = _spool_counter(rig.spool_path, "dropped_readings")
        return outage.dropped_during >= dropped_at_least

    await wait_until(
        _alive(rig, dropped_enough),
        timeout_s=rig.spec.first_reading_s + 30.0 + dropped_at_least / 100,
        what=f"{dropped_at_least} readings dropped by the budget",
        poll_s=0.25,
    )
    outage.lasted_s = time.monotonic() - started
    return outage


async def _broker_back(rig: Rig, outage: _Outage) -> None:
    """Start the broker; return once a health report says the outbox is empty."""
    rig.broker_control.start()
    back = time.monotonic()
    observer = rig.observer

    def drained() -> bool:
        reports = observer.health()
        return bool(reports) and _count(reports[-1], "spool_messages") == 0

    await wait_until(
        _alive(rig, drained), timeout_s=60.0, what="the backlog drained after the outage"
    )
    outage.drained_in_s = time.monotonic() - back


async def _stop_and_count(rig: Rig, outage: _Outage) -> AgentRun:
    """Stop the agent cleanly; check that every reading it accepted reached the broker or
    was counted as dropped, exactly, that health counted the drops, and that no report
    saw the spool over its budget by more than a page."""
    run = await rig.stop_agent()
    assert run.returncode == 0, rig.agent_log()[-3000:]
    observer = rig.observer
    accepted = _summary_count(run, "accepted")
    dropped = _summary_count(run, "dropped_readings")
    last = observer.health()[-1]
    dropped_memory = _count(last, "dropped_memory")
    await wait_until(
        lambda: observer.readings_total() + dropped + dropped_memory >= accepted,
        timeout_s=10.0,
        what=f"all {accepted} accepted readings received or counted as dropped",
    )
    received = observer.readings_total()
    reported = [_count(pack, "spool_bytes") for pack in observer.health()]
    _, page_size = _integrity(rig.spool_path)
    print(
        f"\nbudget {MIB} B: outage {outage.lasted_s:.1f} s, {outage.dropped_during} dropped "
        f"during it; backlog drained in {outage.drained_in_s:.1f} s; accepted {accepted}, "
        f"received {received}, dropped {dropped} (memory {dropped_memory}); health "
        f"spool_bytes max {max(reported)}; files on disk max {outage.footprint} B (database, "
        "write-ahead log, index)"
    )
    assert dropped >= outage.dropped_during > 0
    assert _count(last, "dropped_readings") == dropped, "health counts every drop"
    assert received + dropped + dropped_memory == accepted, (
        "readings lost, or counted as dropped yet received (a message the budget drops "
        "while it is in flight still reaches the broker)"
    )
    spooled = (_summary_count(run, "spooled_readings"),
               _summary_count(run, "spooled_messages"))  # fmt: skip
    assert spooled == (0, 0)
    assert max(reported) <= MIB + page_size, reported
    assert max(reported) >= MIB // 2, f"no report saw the spool full: {reported}"
    assert observer.failures == []
    assert observer.differing_duplicates() == []
    # no `repeated_readings` check: frames read in one burst share a time stamp, so it
    # cannot tell them apart here (the accounting above shows no reading came twice)
    return run


@pytest.mark.parametrize(
    "dropped_at_least",
    [
        pytest.param(SHORT_DROPS, id="short"),
        pytest.param(LONG_DROPS, id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)]),
    ],
)
def test_an_outage_past_the_budget_drops_the_oldest_counts_every_drop_and_the_agent_runs_on(
    rig_spec: RigSpec, tmp_path: Path, dropped_at_least: int
) -> None:
    spec = _fast_rig(rig_spec)

    async def scenario() -> None:
        async with Rig(spec, tmp_path, tuning=BUDGET_TUNING) as rig:
            outage = await _outage_past_the_budget(rig, dropped_at_least)
            # the sensors fall quiet, and what the agent had read is packed, before the broker
            # is back: what the broker gets is what the spool kept through the outage (the
            # next scenario keeps a sensor going)
            for sensor in rig.sensors:
                rig.faults(sensor).silence()
            await wait_until(
                _alive(rig, _Settled(rig.spool_path, for_s=1.0)),
                timeout_s=30.0,
                what="the spool to settle once the sensors were quiet",
                poll_s=0.1,
            )
            await _broker_back(rig, outage)
            await _stop_and_count(rig, outage)
            problems = {
                sid: unbroken_tail_problem(_frames(rig.observer, sid), *_sent(bound.emulator))
                for sid, bound in rig.sensors.items()
                if isinstance(bound.emulator, Pms5003Emulator)
            }
            assert problems, "the rig has no PMS5003 emulator to compare with"
            assert {sid: p for sid, p in problems.items() if p is not None} == {}

    asyncio.run(scenario())


def test_readings_competing_with_the_draining_backlog_for_the_budget_are_counted_exactly(
    rig_spec: RigSpec, tmp_path: Path
) -> None:
    spec = _fast_rig(rig_spec)

    async def scenario() -> None:
        async with Rig(spec, tmp_path, tuning=BUDGET_TUNING) as rig:
            outage = await _outage_past_the_budget(rig, SHORT_DROPS)
            # one sensor streams on while the backlog drains: its readings push the oldest
            # rows out of the full spool while the sender is sending those same rows (the
            # others fall quiet, so that the link easily carries the rest)
            for sensor in list(rig.sensors)[1:]:
                rig.faults(sensor).silence()
            await _broker_back(rig, outage)
            await _stop_and_count(rig, outage)

    asyncio.run(scenario())


#: messages the agent sends while its spool's files are measured: thousands of transactions
#: (one a message), enough for SQLite's write-ahead log to reach its largest size
MEASURED_MESSAGES = 3000


def test_the_spool_files_on_disk_stay_within_the_budget(rig_spec: RigSpec, tmp_path: Path) -> None:
    spec = _fast_rig(rig_spec)

    async def scenario() -> None:
        async with Rig(spec, tmp_path, tuning=BUDGET_TUNING) as rig:
            await rig.start_agent()
            observer = rig.observer
            largest = 0

            def measured() -> bool:
                nonlocal largest
                largest = max(largest, _footprint(rig.spool_path))
                return len(observer.telemetry()) >= MEASURED_MESSAGES

            await wait_until(
                _alive(rig, measured),
                timeout_s=spec.first_reading_s + 30.0,
                what=f"{MEASURED_MESSAGES} messages",
            )
            run = await rig.stop_agent()
            assert run.returncode == 0, rig.agent_log()[-3000:]
            print(
                f"\nbudget {MIB} B: the spool's files took up to {largest} B on disk (database, "
                f"write-ahead log, index) while {MEASURED_MESSAGES} messages went out"
            )
            assert largest <= MIB + FILES_SLACK

    asyncio.run(scenario())


# -- the full disk ----------------------------------------------------------------------------


async def _start_run(rig: Rig, disk: Disk) -> None:
    """Start the agent with its spool on `disk`; return once it reports and sends readings."""
    observer = rig.observer
    reports, received = len(observer.health()), observer.readings_total()
    await rig.start_agent(spool=disk)

    def running() -> bool:
        fresh = observer.health()[reports:]
        return bool(fresh) and observer.readings_total() > received

    await wait_until(
        _alive(rig, running),
        timeout_s=rig.spec.first_reading_s,
        what="a health report and readings of the new run",
    )
    assert _agent(observer.health()[-1], "disk_full") is False


async def _fill_and_free(rig: Rig, disk: Disk) -> int:
    """One full-disk episode of a running agent; returns its `dropped_memory` after it."""
    observer = rig.observer
    alarms, recoveries = len(_events(observer, "disk_full")), len(_events(observer, "disk_ok"))
    memory_dropped_before = _count(observer.health()[-1], "dropped_memory")
    disk.fill()
    await wait_until(
        _alive(rig, lambda: len(_events(observer, "disk_full")) > alarms),
        timeout_s=15.0,
        what="a disk_full event while the disk is full",
    )
    alarm = _events(observer, "disk_full")[-1]
    full_since = time.time()  # readings taken from now until the disk is freed wait in memory
    # nothing can be written while the disk is full: this is what the spool had committed
    committed = read_spool(rig.spool_path)
    reports_before = len(observer.health())

    def full_reports() -> list[SignedPack]:
        return [p for p in observer.health()[reports_before:] if _agent(p, "disk_full") is True]

    def bound_reached() -> bool:
        reports = full_reports()
        return (
            len(reports) >= REPORTS_WHILE_FULL
            and _count(reports[-1], "dropped_memory") > memory_dropped_before
        )

    await wait_until(
        _alive(rig, bound_reached),
        timeout_s=30.0,
        what=f"{REPORTS_WHILE_FULL} health reports saying disk_full, the last one counting "
        f"readings dropped from memory (bound {MEMORY_MAX})",
    )
    held = [_count(p, "spool_readings") for p in full_reports()]
    assert read_spool(rig.spool_path) == committed, "the spool changed while the disk was full"
    disk.free()
    full_until = time.time()

    def recovered() -> bool:
        if len(_events(observer, "disk_ok")) <= recoveries:
            return False
        ok_at = _events(observer, "disk_ok")[-1].arrival.index
        return any(
            p.arrival.index > ok_at and _agent(p, "disk_full") is False for p in observer.health()
        )

    await wait_until(
        _alive(rig, recovered),
        timeout_s=15.0,
        what="a disk_ok event, then a health report without disk_full",
    )
    assert isinstance(_agent(alarm, "reason"), str)
    # the committed readings (unchanged while full) plus what memory holds, which is bounded
    assert max(held) - min(held) <= MEMORY_MAX, held
    await wait_until(
        lambda: set(committed.outbox) <= {seq for _, seq in observer.telemetry()},
        timeout_s=15.0,
        what="every message committed before the disk filled",
    )
    for seq, payload in committed.outbox.items():
        assert payload in observer.capture.raw[(rig.gateway, seq)], f"seq {seq} changed"
    await wait_until(
        lambda: committed.readings <= observer.capture.readings(),
        timeout_s=15.0,
        what="every reading committed before the disk filled",
    )
    await wait_until(
        lambda: any(full_since <= t <= full_until for _, _, t, _ in observer.capture.readings()),
        timeout_s=15.0,
        what="the readings taken while the disk was full, held in memory",
    )
    return _count(observer.health()[-1], "dropped_memory")


@pytest.mark.parametrize(
    "cycles",
    [
        pytest.param(SHORT_CYCLES, id="short"),
        pytest.param(LONG_CYCLES, id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)]),
        pytest.param(
            LONG_FSIZE_CYCLES,
            id="long-fsize",
            marks=[pytest.mark.long, pytest.mark.timeout(1800)],
        ),
    ],
)
def test_a_full_disk_raises_an_alarm_holds_readings_in_memory_and_recovers_intact(
    rig_spec: RigSpec, tmp_path: Path, cycles: tuple[int, int, str | None]
) -> None:
    runs, per_run, mode = cycles

    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path, tuning=DISK_TUNING) as rig:
            rig.require("disk")
            disk = rig.disk(DISK_SIZE, mode=mode)
            observer = rig.observer
            accepted = dropped_memory = 0
            run: AgentRun | None = None
            for _ in range(runs):
                await _start_run(rig, disk)
                run_dropped_memory = 0
                for _ in range(per_run):
                    run_dropped_memory = await _fill_and_free(rig, disk)
                run = await rig.stop_agent()
                assert run.returncode == 0, rig.agent_log()[-3000:]
                assert _integrity(rig.spool_path)[0] == "ok"
                spooled = (_summary_count(run, "spooled_readings"),
                           _summary_count(run, "spooled_messages"))  # fmt: skip
                assert spooled == (0, 0)
                accepted += _summary_count(run, "accepted")
                dropped_memory += run_dropped_memory  # per process
            assert run is not None
            dropped = _summary_count(run, "dropped_readings")  # over the life of the spool
            await wait_until(
                lambda: observer.readings_total() + dropped + dropped_memory >= accepted,
                timeout_s=10.0,
                what=f"all {accepted} accepted readings received or counted as dropped",
            )
            received = observer.readings_total()
            print(
                f"\ndisk {disk.mode} {DISK_SIZE} B, {runs} run(s) x {per_run} fill(s): accepted "
                f"{accepted}, received {received}, dropped in memory {dropped_memory}, by the "
                f"budget {dropped}; events {Counter(_agent(p, 'event') for p in observer.events())}"
            )
            assert received + dropped + dropped_memory == accepted
            assert len(_events(observer, "disk_full")) == runs * per_run
            assert len(_events(observer, "disk_ok")) == runs * per_run
            assert _seqs_reused(observer) == []
            assert observer.failures == []
            assert observer.differing_duplicates() == []
            assert not observer.repeated_readings()

    asyncio.run(scenario())


def test_the_unbroken_run_check_finds_a_hole_a_newest_drop_and_a_missing_record() -> None:
    sent = [(1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6), (5, 6, 7)]

    def frames(*picked: int) -> list[dict[str, float]]:
        return [dict(zip(PMS_RECORDS, map(float, sent[i]), strict=True)) for i in picked]

    assert unbroken_tail_problem(frames(2, 3), sent, 0) is None
    assert unbroken_tail_problem(frames(1, 3), sent, 0) is not None  # a hole
    assert unbroken_tail_problem(frames(0, 1), sent, 0) is not None  # the newest went
    partial = frames(1, 2)
    del partial[1]["pm10"]
    assert unbroken_tail_problem(partial, sent, 0) is not None
    first_partial = frames(1, 2)
    del first_partial[0]["pm1"]
    assert unbroken_tail_problem(first_partial, sent, 0) is None
    assert unbroken_tail_problem(frames(0, 1), sent[1:], 100) is None  # older than remembered
