"""Guarantee 2: power cuts, again and again, lose nothing the spool had committed.

The agent is killed with SIGKILL at random moments (a seeded generator): in
the middle of its start-up; while busy sensors and tiny commit intervals keep
it writing; during outages, with the broker stopped or the network a
blackhole (the connection stays open and swallows every byte, so publishes
wait for PUBACKs that never come); and while the sender drains the backlog
once the link is back. Whatever the gateway had in flight on its link dies
with it (the proxy resets the connection). Right after each cut, before the
restart, the spool file is read as the agent left it: its unpacked readings
and its outbox messages (opened and verified) are what the spool had
*committed*, and the file must pass `PRAGMA integrity_check`. (Outbox rows the
scenario sees while the agent runs count as committed too: another connection
could read them.) The agent then starts again on the same state directory.

At the end the link is up, the agent drains the backlog and stops cleanly, and:

- every committed reading reached the observer (the readings rows, and the
  readings inside the committed outbox messages), and every committed outbox
  message arrived byte for byte as it was stored;
- every copy of a seq on the wire is byte-identical, and no seq ever stood for
  two different signed payloads, on any topic or in the spool; the seq file's
  bound never went back;
- nothing failed verification, and the byte budget dropped nothing (a drop
  would excuse a missing reading);
- the loss window: readings accepted but not yet committed may die with the
  process. A cut's window runs from the newest committed reading of its run
  (of any sensor) to the cut: a commit takes every reading accepted before
  it, so only readings taken within the window can have been lost. It must
  stay within the run's commit interval plus one frame period of the fastest
  sensor plus `ALLOWANCE_S` (`LossWindow.bound_s` says why). Each window,
  and the readings the sensors produce in it, are printed.

Short variant (`make test`): 20 cuts. Long (`--long`): 200.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
import sqlite3
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from agent.envelope import VerifiedMessage
from agent.verify import Verifier, trust_store
from hil_tests.observe import Observer, ReadingKey, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec
from tests.agentrig import read_spool

pytestmark = pytest.mark.integration

SHORT, LONG = 20, 200
SEED = 20260102
#: each run of the agent draws one; the tiny ones keep it writing most of the time
COMMIT_INTERVALS_S = (0.02, 0.05, 0.2, 0.5)
#: small batches and a slow backlog drain, so that a cut after an outage lands while the
#: sender is still working through the backlog
TUNING: Mapping[str, Mapping[str, object]] = {
    "spool": {"batch_max_readings": 8, "batch_interval_s": 0.3},
    "broker": {"backlog_messages_per_s": 15.0, "inflight": 4},
}
#: the last run drains the backlog of every outage at once
FINAL_TUNING: Mapping[str, Mapping[str, object]] = {"broker": {"backlog_messages_per_s": 1000.0}}
#: emulated serial and BLE sensors measure this often (busy sensors: large commits)
BUSY_PERIOD_S = 0.1
#: every fifth cut comes within this long of the start: start-up, spool recovery, first commit
EARLY_CUT_S = 0.6
#: the other cuts come within this long of the moment their run is ready for them
CUT_WITHIN_S = 1.0
#: The loss window's allowance on top of commit interval + one frame period. The committer
#: sleeps the commit interval, then commits (an fsync) and packs; a reading is stamped when
#: its frame is read. Both run on one event loop, on two cores shared with the broker, the
#: emulators (threads of this test), the observer and this test, so a wake-up or a frame
#: can come late. A quarter of a second covers that and still fails an agent that commits
#: later than it says (by half a second, as checked by breaking it; or not periodically).
ALLOWANCE_S = 0.25
#: how often the scenario looks for new outbox rows while the agent runs
WATCH_S = 0.02
#: the agent's link at a cut: the broker up; the broker stopped; the network a blackhole
UP, BROKER_DOWN, BLACKHOLE = "up", "broker down", "blackhole"


@dataclass(frozen=True)
class Cut:
    """One power cut: its run, and what the spool had committed when it came."""

    index: int
    run_started: float  # time.time() just before the agent was started
    at: float  # time.time() once the agent was dead (at or just after the SIGKILL)
    commit_interval_s: float
    armed: bool  # every sensor had a committed reading of this run before the cut
    link: str  # UP, BROKER_DOWN or BLACKHOLE
    after_outage: bool  # the link came back during this run
    readings: frozenset[ReadingKey]  # committed, not yet packed
    outbox: frozenset[int]  # seqs of committed messages (their payloads: `_Spool.payloads`)
    seq_bound: int  # the seq file's bound after the cut


@dataclass
class _Delivered:
    """Telemetry at the observer, indexed as it arrives (the observer's own views recount
    everything on each call: too slow to poll through a long run)."""

    observer: Observer
    keys: set[ReadingKey] = field(default_factory=set)
    times: dict[str, set[float]] = field(default_factory=lambda: defaultdict(set))
    newest: dict[str, float] = field(default_factory=dict)
    seqs: set[int] = field(default_factory=set)
    _seen: int = 0

    def update(self) -> None:
        messages = self.observer.capture.messages
        for message in messages[self._seen :]:
            self.seqs.add(message.seq)
            for r in message.records:
                self.keys.add(_key(r.sensor, r.n, r.t, r.v))
                self.times[r.sensor].add(r.t)
                self.newest[r.sensor] = max(r.t, self.newest.get(r.sensor, r.t))
        self._seen = len(messages)

    def sensors_since(self, since: float) -> set[str]:
        self.update()
        return {sensor for sensor, newest in self.newest.items() if newest >= since}


class _Spool:
    """The agent's spool file, read-only. `watch` notes every outbox message the agent
    commits (a row another connection can read is committed), opened and verified once
    per payload: `payloads` keeps each seq's payloads, `newest` each sensor's newest
    stamp among them."""

    def __init__(self, rig: Rig) -> None:
        lab = rig.lab
        self._verifier = Verifier(trust_store(lab.ca_cert, [lab.clients[rig.gateway][0]]))
        self._topic = f"{rig.observer.prefix}/{rig.gateway}/telemetry"
        self._path = rig.spool_path
        self._opened: dict[bytes, VerifiedMessage] = {}
        self._highest = -1  # rows appear in seq order: those above it are new
        self.payloads: dict[int, set[bytes]] = defaultdict(set)
        self.newest: dict[str, float] = {}

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=1.0)

    def _open(self, seq: int, payload: bytes) -> None:
        if payload in self._opened:
            return
        message = self._verifier.check(self._topic, payload)
        assert message.seq == seq, f"outbox row {seq} holds a message signed as {message.seq}"
        self._opened[payload] = message
        self.payloads[seq].add(payload)
        for r in message.records:
            self.newest[r.sensor] = max(r.t, self.newest.get(r.sensor, r.t))
        self._highest = max(self._highest, seq)

    async def watch(self) -> None:
        """Until cancelled, look for new outbox rows every WATCH_S."""
        while True:
            with contextlib.suppress(sqlite3.Error):  # not created yet, or busy: next time
                db = self._connect()
                try:
                    rows = db.execute(
                        "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq",
                        (self._highest,),
                    ).fetchall()
                finally:
                    db.close()
                for seq, payload in rows:
                    self._open(seq, bytes(payload))
            await asyncio.sleep(WATCH_S)

    def readings_of(self, seq: int) -> set[ReadingKey]:
        """The readings inside the committed message(s) numbered `seq`."""
        return {
            _key(r.sensor, r.n, r.t, r.v)
            for payload in self.payloads[seq]
            for r in self._opened[payload].records
        }

    def sensors_since(self, since: float) -> set[str]:
        """Sensors with a reading stamped at or after `since` in the readings table or in
        an outbox message seen by `watch`."""
        found = {sensor for sensor, newest in self.newest.items() if newest >= since}
        with contextlib.suppress(sqlite3.Error):  # not created yet, or busy: next time
            db = self._connect()
            try:
                rows = db.execute(
                    "SELECT DISTINCT c.sensor FROM readings r "
                    "JOIN channels c ON c.id = r.channel WHERE r.t >= ?",
                    (since,),
                ).fetchall()
            finally:
                db.close()
            found.update(str(sensor) for (sensor,) in rows)
        return found

    def outbox_seqs(self) -> set[int]:
        db = self._connect()
        try:
            return {int(seq) for (seq,) in db.execute("SELECT seq FROM outbox")}
        finally:
            db.close()

    def snapshot(self) -> tuple[frozenset[ReadingKey], frozenset[int]]:
        """After a cut: the committed readings rows and outbox seqs; the file must be sound."""
        db = self._connect()
        try:
            integrity = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
        finally:
            db.close()
        assert integrity == ["ok"], f"{self._path}: {integrity}"
        spool = read_spool(self._path)
        for seq, payload in spool.outbox.items():
            self._open(seq, payload)
        return frozenset(spool.readings), frozenset(spool.outbox)


def _key(sensor: str, quantity: str, t: float, value: float | str | bool) -> ReadingKey:
    """A reading as `tests.agentrig.read_spool` keys them."""
    assert isinstance(value, int | float), f"{sensor} {quantity}: a non-numeric value"
    return (sensor, quantity, round(t, 3), float(value))


def _seq_bound(state_dir: Path) -> int:
    """The bound in the agent's seq file (agent.seq): no number at or above it was issued."""
    files = [p for p in state_dir.glob("seq-*") if not p.name.endswith(".tmp")]
    assert len(files) == 1, f"one seq file expected in {state_dir}, found {files}"
    return int(files[0].read_text().strip())


def _busy(spec: RigSpec) -> RigSpec:
    """The rig with its emulated serial and BLE sensors measuring every BUSY_PERIOD_S; a
    real rig's sensors keep their own pace."""
    if not spec.emulated:
        return spec
    sensors = tuple(
        replace(s, period_s=min(s.period_s, BUSY_PERIOD_S))
        if s.transport in ("serial", "ble")
        else s
        for s in spec.sensors
    )
    return replace(spec, sensors=sensors)


def _link_plan(rng: random.Random, cuts: int) -> list[str]:
    """The agent's link at each cut: up for 1-3 cuts, then an outage (the broker stopped,
    or the network a blackhole) for 2-4, and so on; up at the first cut."""
    plan: list[str] = []
    outage = False
    while len(plan) < cuts:
        if outage:
            plan.extend([rng.choice((BROKER_DOWN, BLACKHOLE))] * rng.randint(2, 4))
        else:
            plan.extend([UP] * rng.randint(1, 3))
        outage = not outage
    return plan[:cuts]


def _set_link(rig: Rig, link: str) -> bool:
    """Bring the agent's link to `link`; True when that ends an outage."""
    control, proxy = rig.broker_control, rig.proxy
    back = link == UP and (not control.running or proxy.mode != "open")
    if link == BROKER_DOWN and control.running:
        control.stop()
    elif link != BROKER_DOWN and not control.running:
        control.start()
    if link == BLACKHOLE and proxy.mode != "blackhole":
        proxy.blackhole()
    elif link != BLACKHOLE and proxy.mode != "open":
        proxy.restore()
    return back


async def _cut_at_random(
    rig: Rig,
    rng: random.Random,
    *,
    index: int,
    link: str,
    spool: _Spool,
    delivered: _Delivered,
) -> Cut:
    """Start the agent, bring the link to `link`, choose a moment, cut the power; return
    what the spool had committed."""
    interval = rng.choice(COMMIT_INTERVALS_S)
    started = time.time()
    early = index % 5 == 4
    if early:  # the link changes while the agent is off
        _set_link(rig, link)
    await rig.start_agent(tuning={"spool": {"commit_interval_s": interval}})
    after_outage = False
    if not early:  # the link changes under a running agent, once every sensor committed
        names = set(rig.sensors)
        await wait_until(
            lambda: names <= spool.sensors_since(started) | delivered.sensors_since(started),
            timeout_s=rig.spec.first_reading_s,
            what=f"cut {index}: a committed reading of every sensor",
        )
        after_outage = _set_link(rig, link)
        if after_outage:  # cut while the backlog drains: once the first of it has arrived
            before = len(rig.observer.capture.messages)
            await wait_until(
                lambda: len(rig.observer.capture.messages) > before,
                timeout_s=15.0,
                what=f"cut {index}: the backlog arriving after the outage",
            )
    await rig.power().kill_at_random(rng, EARLY_CUT_S if early else CUT_WITHIN_S)
    killed = time.time()
    rig.proxy.reset()  # what the gateway had in flight on its link dies with it
    readings, outbox = spool.snapshot()
    return Cut(
        index=index,
        run_started=started,
        at=killed,
        commit_interval_s=interval,
        armed=not early,
        link=link,
        after_outage=after_outage,
        readings=readings,
        outbox=outbox,
        seq_bound=_seq_bound(rig.state_dir),
    )


@pytest.mark.parametrize(
    "cuts", [SHORT, pytest.param(LONG, marks=[pytest.mark.long, pytest.mark.timeout(1800)])]
)
def test_repeated_power_cuts_lose_nothing_committed_and_resend_byte_identical(
    rig_spec: RigSpec, tmp_path: Path, cuts: int
) -> None:
    async def scenario() -> None:
        async with Rig(_busy(rig_spec), tmp_path, tuning=TUNING) as rig:
            rig.require("power")
            rig.require("broker")
            rig.require("network")
            rng = random.Random(SEED)
            spool = _Spool(rig)
            delivered = _Delivered(rig.observer)
            watch = asyncio.create_task(spool.watch())
            try:
                done = [
                    await _cut_at_random(
                        rig, rng, index=index, link=link, spool=spool, delivered=delivered
                    )
                    for index, link in enumerate(_link_plan(rng, cuts))
                ]
                _set_link(rig, UP)
                await rig.start_agent(tuning=FINAL_TUNING)
                stored = set(spool.payloads)  # every message the spool was seen to hold
                await wait_until(
                    lambda: not stored & spool.outbox_seqs(),
                    timeout_s=60.0 + cuts,
                    what="the backlog of every outage acknowledged",
                )
                run = await rig.stop_agent()
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            assert run.returncode == 0, rig.agent_log()[-4000:]
            assert run.summary is not None
            assert run.summary["dropped_readings"] == 0, "the budget dropped committed readings"
            committed = set().union(*(c.readings for c in done), *map(spool.readings_of, stored))

            def arrived() -> bool:
                delivered.update()
                return committed <= delivered.keys and stored <= delivered.seqs

            with contextlib.suppress(AssertionError):  # _check says what did not arrive
                await wait_until(arrived, timeout_s=10.0, what="the last copies")
            _check(rig, done, spool, delivered)

    asyncio.run(scenario())


def _check(rig: Rig, cuts: list[Cut], spool: _Spool, delivered: _Delivered) -> None:
    observer = rig.observer
    delivered.update()
    assert observer.failures == []
    # a seq never stood for two payloads (spool and wire, every topic), nor went back
    payloads: dict[int, set[bytes]] = defaultdict(set)
    for seq, stored in spool.payloads.items():
        payloads[seq] |= stored
    for arrival in observer.arrivals:
        if arrival.message is not None:
            payloads[arrival.message.seq].add(arrival.payload)
    reused = {seq: len(p) for seq, p in payloads.items() if len(p) > 1}
    assert reused == {}, f"seqs used for different payloads: {reused}"
    assert observer.differing_duplicates() == []
    bounds = [c.seq_bound for c in cuts]
    assert bounds == sorted(bounds)
    assert max(payloads) < _seq_bound(rig.state_dir)
    # every committed reading arrived, and every committed message byte for byte
    for cut in cuts:
        rows = cut.readings - delivered.keys
        assert not rows, f"cut {cut.index}: {len(rows)} committed readings lost, e.g. {min(rows)}"
    for seq, stored in sorted(spool.payloads.items()):
        packed = spool.readings_of(seq) - delivered.keys
        assert not packed, f"message {seq}: {len(packed)} readings lost, e.g. {min(packed)}"
        sent = set(observer.capture.raw[(rig.gateway, seq)])
        other = f"came as {len(sent - stored)} other payload(s)" if sent else "never came"
        assert sent == stored, f"message {seq}, committed in the spool, {other}"
    assert any(c.outbox for c in cuts), "no cut caught a message in the outbox"
    windows = _loss_windows(delivered, cuts)
    _report(cuts, windows, observer)
    beyond = [w for w in windows if w.gap_s > w.bound_s]
    assert not beyond, "loss windows beyond commit interval + frame period + allowance: " + (
        ", ".join(f"cut {w.cut.index}: {w.gap_s:.3f} s > {w.bound_s:.3f} s" for w in beyond)
    )


@dataclass(frozen=True)
class LossWindow:
    """A cut's loss window: from the newest committed reading of its run (of any sensor)
    to the cut. A commit takes every reading accepted before it, so the last commit came
    no earlier than that reading: only readings taken within the window can be lost."""

    cut: Cut
    gap_s: float
    frame_s: float  # the frame period of the rig's fastest sensor
    lost: int  # readings lost, estimated: what every sensor produces in the window

    @property
    def bound_s(self) -> float:
        """The commit interval, plus one frame period (the newest reading a commit takes is
        at most that old, the fastest sensor delivering steadily), plus ALLOWANCE_S."""
        return self.cut.commit_interval_s + self.frame_s + ALLOWANCE_S


def _loss_windows(delivered: _Delivered, cuts: Iterable[Cut]) -> list[LossWindow]:
    """The loss window of every armed cut (every sensor had committed a reading of its
    run by then, so the run's sensors were all delivering)."""
    armed = [c for c in cuts if c.armed]
    stamps = {sensor: sorted(times) for sensor, times in delivered.times.items()}
    periods = _frame_periods(stamps, armed)
    counts = Counter(key[0] for key in delivered.keys)
    rate = sum(counts[s] / len(stamps[s]) / p for s, p in periods.items() if p > 0)  # per s
    fastest = min(p for p in periods.values() if p > 0)
    windows: list[LossWindow] = []
    for cut in armed:
        before = [times[: bisect.bisect_right(times, cut.at)] for times in stamps.values()]
        newest = max(times[-1] for times in before if times)
        assert newest >= cut.run_started, f"cut {cut.index}: none of its committed readings came"
        gap = cut.at - newest
        windows.append(LossWindow(cut, gap, fastest, round(gap * rate)))
    return windows


def _frame_periods(stamps: Mapping[str, list[float]], cuts: Iterable[Cut]) -> dict[str, float]:
    """Each sensor's frame period as observed: the median interval between its successive
    stamps within one run (the readings of one frame share a stamp)."""
    periods: dict[str, float] = {}
    for sensor, times in stamps.items():
        gaps: list[float] = []
        for cut in cuts:
            run = times[
                bisect.bisect_left(times, cut.run_started) : bisect.bisect_right(times, cut.at)
            ]
            gaps.extend(b - a for a, b in itertools.pairwise(run))
        periods[sensor] = statistics.median(gaps) if gaps else 0.0
    return periods


def _report(cuts: list[Cut], windows: list[LossWindow], observer: Observer) -> None:
    """The figures: how the cuts fell, the duplicates, each cut's loss window against its
    bound, and the largest per commit interval."""
    armed = sum(c.armed for c in cuts)
    print(
        f"\npower cuts: {len(cuts)} ({armed} once every sensor had committed, "
        f"{len(cuts) - armed} within {EARLY_CUT_S} s of the start); "
        f"{sum(c.link == BROKER_DOWN for c in cuts)} with the broker down, "
        f"{sum(c.link == BLACKHOLE for c in cuts)} with the network a blackhole, "
        f"{sum(c.after_outage for c in cuts)} while the backlog drained, "
        f"{sum(bool(c.outbox) for c in cuts)} with messages in the outbox"
    )
    print(
        f"wire: {len(observer.capture.raw)} telemetry messages, "
        f"{observer.duplicate_copies()} duplicate copies (re-sends), "
        f"{len(observer.differing_duplicates())} differing"
    )
    by_cut = {w.cut.index: w for w in windows}
    for cut in cuts:
        window = by_cut.get(cut.index)
        figures = (
            f"loss window {window.gap_s:.3f} s (bound {window.bound_s:.3f} s), "
            f"~{window.lost} reading(s)"
            if window is not None
            else "loss window not measured (a cut during the start)"
        )
        print(
            f"cut {cut.index:3d}: commit_interval_s {cut.commit_interval_s:<4g} link "
            f"{cut.link:<11} outbox {len(cut.outbox):4d}; {figures}"
        )
    for interval in sorted({w.cut.commit_interval_s for w in windows}):
        group = [w for w in windows if w.cut.commit_interval_s == interval]
        worst = max(group, key=lambda w: w.gap_s)
        print(
            f"commit_interval_s {interval:g}: {len(group)} cuts; largest loss window "
            f"{worst.gap_s:.3f} s (cut {worst.cut.index}; bound {worst.bound_s:.3f} s), "
            f"median {statistics.median(w.gap_s for w in group):.3f} s; "
            f"at most ~{max(w.lost for w in group)} readings in a cut"
        )
