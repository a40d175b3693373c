"""Guarantee 4, sensor faults: the faulty sensor is reported and retried, the others keep
their pace, and it comes back by itself.

One agent run on the rig. Per transport one sensor (the rig's first of that transport)
goes through the faults the rig can inject on it, one after the other, in a "lane"; the
lanes run at the same time. Serial: noise and bad checksums between good frames (no fault:
the sensor must stay available), unplug and replug, garbage only (silent, but noise and bad
frames on the line), silence. Modbus: exception replies, answers later than the timeout,
no answer, the bus unplugged. BLE: the tag removed from BlueZ, silence. With --long the
lanes pick faults at random for minutes.

For each fault the scenario checks, from outside the agent:

- health reports the sensor `available` = false with a `reason` naming the fault, and a
  `sensor_fault` event with that reason arrives (every sensor is up before the first fault,
  so the startup grace of agent.health does not apply);
- where the agent retries, the retry delays it logs grow (read from the log, never timed);
  a driver counter in health shows the fault (reopens, bad bytes, exceptions, ...);
- after replug or clear the sensor comes back by itself: `sensor_recovered`, available
  again, its readings resume; the agent is never restarted;
- every other sensor keeps its period: within each fault's window, the median interval
  between its readings' timestamps is within 10 % of its configured period.

At the end: no sensor that was never faulted raised a `sensor_fault`, each sensor's median
period over the whole run (outside its own faults) is within 10 %, and a clean stop lost
nothing. Figures (time to detect, time to recover, periods) are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import random
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drivers import family
from drivers.modbus.options import ModbusOptions
from hil_tests.observe import Observer, SignedPack, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec, SensorSpec
from hil_tests.sensors import BoundSensor, SensorFaults

pytestmark = pytest.mark.integration

#: the silence timeout of the sensors put through faults (the drivers' defaults are 10 to
#: 300 s): short, so that a silent sensor is noticed within seconds
SILENCE_S = 2.0
#: how far a sensor's median interval may be from its configured period
TOLERANCE = 0.10
#: intervals needed in a window before its median is judged (a Modbus poll that follows a
#: late one comes early, on its grid: a median of few intervals would judge that jitter)
MIN_INTERVALS = 5
#: periods after a sensor's own recovery that are not judged (its first polls or frames)
SETTLING_PERIODS = 2
#: periods a lane's sensor runs healthy (after settling) before each fault, while the
#: other lanes inject theirs
HEALTHY_PERIODS = 4
#: how long the long variant keeps injecting faults
LONG_S = 300.0
#: how long noise and bad frames are sent between good frames (the "noise" case)
NOISE_S = 2.5
#: between two bursts of garbage
GARBAGE_EVERY_S = 0.2
#: deadlines that only turn a hang into a failure (the longest backoff is 30 s)
NOTICE_S = SILENCE_S + 15.0
RECOVER_S = 45.0
#: retry delays read from the log before the fault is cleared
DELAYS_SEEN = 3
POLL_S = 0.1


# -- what the faults are ------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultKind:
    """One fault a lane can inject. `reason` must match the health reason and the event's;
    `retries` finds the retry delays the agent logs (None: nothing is retried, e.g. a BLE
    tag is only listened to); `counter` is a driver counter in health that must grow."""

    name: str
    needs: str  # the rig's name of the fault (`Rig.require`)
    reason: str
    retries: Callable[[BoundSensor], str] | None = None
    counter: str | None = None
    delays: int = DELAYS_SEEN
    is_fault: bool = True  # False: the sensor must stay available through it


def _serial_retries(sensor: BoundSensor) -> str:
    return rf"{sensor.spec.sensor_id}: retrying \S+ in ([\d.]+) s"


def _bus_retries(sensor: BoundSensor) -> str:
    return rf"bus {re.escape(str(sensor.table['port']))}: retrying in ([\d.]+) s"


def _poll_backoff(sensor: BoundSensor) -> str:
    return rf"{sensor.spec.sensor_id}: no answer \d+ times in a row; next poll in ([\d.]+) s"


NOISE = FaultKind("noise", "noise", "", counter="bad_frames", is_fault=False)
SERIAL = (
    NOISE,
    FaultKind(
        "unplug",
        "unplug",
        r"cannot open \S+: No such file or directory|port lost: hung up",
        _serial_retries,
        "reopens",
    ),
    FaultKind(
        "garbage", "noise", r"no valid frame for [\d.]+ s, only garbage", counter="bad_bytes"
    ),
    FaultKind("silence", "silence", r"silent for [\d.]+ s"),
)
_NO_ANSWER = r"no answer from unit \d+ within \d+ ms"
MODBUS = (
    FaultKind("exception", "modbus_exception", r"exception 04", counter="exceptions"),
    FaultKind("slow", "slow", _NO_ANSWER, _poll_backoff, "polls_skipped", delays=2),
    FaultKind("silence", "silence", _NO_ANSWER, _poll_backoff, "polls_skipped", delays=2),
    FaultKind(
        "unplug",
        "unplug",
        r"cannot (open|connect to) \S+:? \(?(no such device|refused)",
        _bus_retries,
        "link_down",
    ),
)
BLE = (
    FaultKind("unplug", "unplug", r"no valid advertisement for [\d.]+ s"),
    FaultKind("silence", "silence", r"no valid advertisement for [\d.]+ s"),
)
LANES: Mapping[str, Sequence[FaultKind]] = {
    "serial": SERIAL,
    "modbus-rtu": MODBUS,
    "modbus-tcp": MODBUS,
    "ble": BLE,
}
#: to stay quick, the short variant gives a Modbus RTU sensor only what a serial line does
#: differently (late answers, a hung-up adapter); Modbus TCP takes every fault
SHORT_SKIPS = {"modbus-rtu": {"exception", "silence"}}


@dataclass
class Window:
    """One fault as it happened, in wall-clock seconds (as readings are stamped).
    `victims` are the sensors it made unavailable (a bus takes all its devices along);
    `end` is when the sensor's readings resumed."""

    kind: str
    sensor: str
    victims: frozenset[str]
    start: float
    end: float = math.inf
    detected_s: float = math.nan  # injection -> health says unavailable (figures)
    recovered_s: float = math.nan  # clear -> health says available again
    delays: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Mark:
    """A moment of the run: what the observer had received by then, the agent's log size,
    and the clocks (wall clock as readings are stamped; monotonic for figures)."""

    arrivals: int
    messages: int
    log: int
    wall: float
    mono: float

    @classmethod
    def now(cls, rig: Rig) -> Mark:
        observer = rig.observer
        log = rig.log_path.stat().st_size if rig.log_path.exists() else 0
        return cls(
            len(observer.arrivals),
            len(observer.capture.messages),
            log,
            time.time(),
            time.monotonic(),
        )


# -- the scenario -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "random_s",
    [
        pytest.param(0.0, id="short"),
        pytest.param(LONG_S, id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)]),
    ],
)
def test_a_faulty_sensor_is_reported_retried_and_recovers_while_the_others_keep_their_period(
    rig_spec: RigSpec, tmp_path: Path, random_s: float
) -> None:
    if not rig_spec.supports("sensors"):  # before the rig binds a real rig's hardware
        pytest.skip(f"rig {rig_spec.name} does not inject sensor faults")
    spec = _short_silence(rig_spec)

    async def scenario() -> None:
        async with Rig(spec, tmp_path) as rig:
            lanes = _lanes(rig, long_run=random_s > 0)
            await rig.start_agent()
            await wait_until(
                lambda: all(_latest(rig.observer, sid) is True for sid in rig.sensors),
                timeout_s=spec.first_reading_s,
                what="every sensor available in health",
            )
            started = time.time()
            windows: list[Window] = []
            rng = random.Random(4)
            deadline = time.monotonic() + random_s
            await asyncio.gather(
                *(
                    _run_lane(rig, sensor, kinds, windows, rng, deadline)
                    for sensor, kinds in lanes.items()
                )
            )
            stopped = time.time()
            run = await rig.stop_agent()
            assert run.returncode == 0, rig.agent_log()
            _print_figures(rig, windows)
            _check_no_false_alarms(rig.observer, windows)
            _check_periods(rig, windows, started, stopped)
            assert run.summary is not None, "a clean stop writes last-run.json"
            await _check_nothing_lost(rig.observer, run.summary)

    asyncio.run(scenario())


def _short_silence(spec: RigSpec) -> RigSpec:
    """The rig with SILENCE_S as the silence timeout of each serial and BLE sensor that a
    lane will use (the first of each transport)."""
    firsts = {s.transport: s.sensor_id for s in reversed(spec.sensors)}
    changed = tuple(
        dataclasses.replace(s, options={**s.options, "silence_timeout_s": SILENCE_S})
        if firsts.get(s.transport) == s.sensor_id and s.transport in ("serial", "ble")
        else s
        for s in spec.sensors
    )
    return dataclasses.replace(spec, sensors=changed)


def _lanes(rig: Rig, *, long_run: bool) -> dict[str, list[FaultKind]]:
    """sensor id -> the faults its lane injects: the first sensor of each transport, each
    fault the rig supports (a rig that supports none skips the scenario)."""
    lanes: dict[str, list[FaultKind]] = {}
    for transport, kinds in LANES.items():
        sensor = next((s for s in rig.spec.sensors if s.transport == transport), None)
        if sensor is None:
            continue
        faults = rig.faults(sensor.sensor_id)
        skips = set() if long_run else SHORT_SKIPS.get(transport, set())
        usable = [k for k in kinds if faults.supports(k.needs) and k.name not in skips]
        if usable:
            lanes[sensor.sensor_id] = usable
    if not lanes:
        pytest.skip(f"rig {rig.spec.name}: no sensor takes the faults of this scenario")
    return lanes


async def _run_lane(
    rig: Rig,
    sensor_id: str,
    kinds: Sequence[FaultKind],
    windows: list[Window],
    rng: random.Random,
    deadline: float,
) -> None:
    """Each fault once; then, until `deadline` (the long variant), faults picked at random.
    Before each fault the sensor runs healthy for a few periods, while the other lanes
    inject theirs: its period is judged then."""
    sensor = rig.sensors[sensor_id]
    healthy_s = (SETTLING_PERIODS + HEALTHY_PERIODS) * _configured_period(sensor)
    for kind in kinds:
        await asyncio.sleep(healthy_s)
        await _exercise(rig, sensor, kind, windows, hold_s=0.0)
    while time.monotonic() < deadline:
        await asyncio.sleep(healthy_s + rng.uniform(0, 3))
        await _exercise(rig, sensor, rng.choice(kinds), windows, rng.uniform(0, 3))


async def _exercise(
    rig: Rig, sensor: BoundSensor, kind: FaultKind, windows: list[Window], hold_s: float
) -> None:
    """Inject one fault, see it reported and retried, clear it, see the sensor come back."""
    if not kind.is_fault:
        await _noise_is_no_fault(rig, sensor, windows)
        return
    observer, sid = rig.observer, sensor.spec.sensor_id
    counter_before = _counter(observer, sid, kind.counter)
    injected = Mark.now(rig)
    window = Window(kind.name, sid, _victims(rig, sensor, kind), injected.wall)
    windows.append(window)
    async with _injected(kind, sensor, sensor.faults):
        await _wait_reported(observer, sid, injected, kind)
        window.detected_s = time.monotonic() - injected.mono
        await wait_until(
            lambda: _event(observer, sid, injected, "sensor_fault", kind.reason),
            timeout_s=NOTICE_S,
            what=f"a sensor_fault event for {sid} naming the {kind.name}",
            poll_s=POLL_S,
        )
        if kind.retries is not None:
            pattern = re.compile(kind.retries(sensor))
            window.delays = await _retry_delays(rig, pattern, injected, kind)
        await asyncio.sleep(hold_s)
        cleared = Mark.now(rig)
    await _recovered(observer, window, cleared)
    window.recovered_s = time.monotonic() - cleared.mono
    if kind.counter is not None:
        after = _counter(observer, sid, kind.counter)
        assert after > counter_before, (
            f"{sid} {kind.name}: {kind.counter} {counter_before} -> {after}"
        )


async def _retry_delays(
    rig: Rig, pattern: re.Pattern[str], since: Mark, kind: FaultKind
) -> list[float]:
    """The first `kind.delays` retry delays logged since `since`; they must grow."""
    await wait_until(
        lambda: len(_delays(rig, since, pattern)) >= kind.delays,
        timeout_s=RECOVER_S,
        what=f"{kind.delays} retries in the agent's log ({pattern.pattern})",
        poll_s=POLL_S,
    )
    delays = _delays(rig, since, pattern)
    assert _growing(delays), f"{kind.name}: retry delays {delays} ({pattern.pattern})"
    return delays


async def _wait_reported(observer: Observer, sid: str, since: Mark, kind: FaultKind) -> None:
    """Until health since `since` says `sid` is unavailable for a reason like the fault's."""
    try:
        await wait_until(
            lambda: _health_matches(observer, sid, since, available=False, reason=kind.reason),
            timeout_s=NOTICE_S,
            what=f"{sid} unavailable in health after {kind.name}, with a reason like "
            f"{kind.reason!r}",
            poll_s=POLL_S,
        )
    except AssertionError as exc:
        seen = {str(report.get("reason")) for report in _health_since(observer, sid, since)}
        raise AssertionError(f"{exc}; reasons reported meanwhile: {sorted(seen)}") from None


def _victims(rig: Rig, sensor: BoundSensor, kind: FaultKind) -> frozenset[str]:
    """The sensor, and for an unplugged Modbus bus every device on it."""
    if kind.name == "unplug" and sensor.spec.family == "modbus":
        port = sensor.table["port"]
        return frozenset(
            sid for sid, other in rig.sensors.items() if other.table.get("port") == port
        )
    return frozenset({sensor.spec.sensor_id})


@contextlib.asynccontextmanager
async def _injected(
    kind: FaultKind, sensor: BoundSensor, faults: SensorFaults
) -> AsyncIterator[None]:
    """The fault for the duration of the block; then replugged or cleared."""
    match kind.name:
        case "unplug":
            faults.unplug()
        case "garbage" | "silence":
            faults.silence(True)
        case "exception":
            faults.modbus_exception(4)
        case "slow":
            # late, but before the end of the quiet time an RTU bus keeps after a timeout
            faults.slow(1.5 * _modbus_options(sensor).profile.timeout_s)
        case other:
            raise AssertionError(f"no injector for {other}")
    try:
        if kind.name == "garbage":
            async with _garbage(faults):
                yield
        else:
            yield
    finally:
        if kind.name == "unplug":
            faults.replug()
        else:
            faults.clear()


@contextlib.asynccontextmanager
async def _garbage(faults: SensorFaults) -> AsyncIterator[None]:
    """Noise and bad-checksum frames on the line until the block ends."""

    async def send() -> None:
        for burst in itertools.count():
            if burst % 2:
                faults.noise(24)
            else:
                faults.bad_checksum()
            await asyncio.sleep(GARBAGE_EVERY_S)

    task = asyncio.create_task(send(), name=f"garbage-{faults.sensor_id}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _modbus_options(sensor: BoundSensor) -> ModbusOptions:
    """A Modbus sensor's options as its driver reads them."""
    table = {k: v for k, v in sensor.table.items() if k != "bin"}  # the agent's, not the driver's
    options = family("modbus").parse_options(sensor.spec.sensor_id, table)
    assert isinstance(options, ModbusOptions)
    return options


async def _noise_is_no_fault(rig: Rig, sensor: BoundSensor, windows: list[Window]) -> None:
    """Noise and bad frames between good frames: counted, never a fault."""
    observer, sid = rig.observer, sensor.spec.sensor_id
    before = _counter(observer, sid, "bad_frames")
    started = Mark.now(rig)
    window = Window("noise", sid, frozenset(), started.wall)
    windows.append(window)
    async with _garbage(sensor.faults):
        await asyncio.sleep(NOISE_S)
    ended = Mark.now(rig)
    await wait_until(
        lambda: _health_since(observer, sid, ended) != [],
        timeout_s=NOTICE_S,
        what=f"a health report on {sid} after the noise",
        poll_s=POLL_S,
    )
    window.end = time.time()
    states = [h.get("available") for h in _health_since(observer, sid, started)]
    assert states, f"no health report on {sid} during the noise"
    assert all(state is True for state in states), f"{sid} during noise: {states}"
    assert not _events_since(observer, sid, started), f"{sid}: events for mere noise"
    after = _counter(observer, sid, "bad_frames")
    assert after > before, f"{sid}: bad frames counted {before} -> {after}"


async def _recovered(observer: Observer, window: Window, cleared: Mark) -> None:
    """After the replug or clear, each victim by itself: sensor_recovered, available in
    health, readings again. The window ends with the last victim's first new reading."""
    for sid in sorted(window.victims):
        await _back(observer, sid, window.kind, cleared)
    window.end = max(_times_after(observer, sid, cleared)[0] for sid in window.victims)


async def _back(observer: Observer, sid: str, kind: str, cleared: Mark) -> None:
    await wait_until(
        lambda: _event(observer, sid, cleared, "sensor_recovered"),
        timeout_s=RECOVER_S,
        what=f"{sid} recovering by itself after {kind}",
        poll_s=POLL_S,
    )
    await wait_until(
        lambda: _health_matches(observer, sid, cleared, available=True),
        timeout_s=NOTICE_S,
        what=f"{sid} available again in health after {kind}",
        poll_s=POLL_S,
    )
    await wait_until(
        lambda: len(_times_after(observer, sid, cleared)) >= 2,
        timeout_s=NOTICE_S,
        what=f"{sid}'s readings resuming after {kind}",
        poll_s=POLL_S,
    )


# -- what the observer and the log say ------------------------------------------------------------


def _latest(observer: Observer, sid: str) -> object:
    return observer.latest("health", sid, "available")


def _packs_since(observer: Observer, kind: str, since: Mark) -> list[SignedPack]:
    return [
        SignedPack(a, a.message)
        for a in observer.arrivals[since.arrivals :]
        if a.kind == kind and a.message is not None
    ]


def _health_since(observer: Observer, sid: str, since: Mark) -> list[dict[str, float | str | bool]]:
    found = (pack.subjects().get(sid) for pack in _packs_since(observer, "health", since))
    return [group for group in found if group is not None]


def _health_matches(
    observer: Observer, sid: str, since: Mark, *, available: bool, reason: str = ""
) -> bool:
    """The last health report since `since` says `available`, with a reason like `reason`."""
    reports = _health_since(observer, sid, since)
    if not reports or reports[-1].get("available") is not available:
        return False
    return re.search(reason, str(reports[-1].get("reason", ""))) is not None


def _events_since(observer: Observer, sid: str, since: Mark) -> list[dict[str, float | str | bool]]:
    found = (pack.subjects().get(sid) for pack in _packs_since(observer, "events", since))
    return [group for group in found if group is not None]


def _event(observer: Observer, sid: str, since: Mark, kind: str, reason: str = "") -> bool:
    return any(
        e.get("event") == kind and re.search(reason, str(e.get("reason", ""))) is not None
        for e in _events_since(observer, sid, since)
    )


def _counter(observer: Observer, sid: str, name: str | None) -> float:
    value = observer.latest("health", sid, name) if name is not None else None
    return float(value) if isinstance(value, int | float) else 0.0


def _times_after(observer: Observer, sid: str, since: Mark) -> list[float]:
    """`sid`'s reading times after `since` (a reading arrives after it is taken: only the
    messages since then are looked at)."""
    return sorted(
        {
            r.t
            for m in observer.capture.messages[since.messages :]
            for r in m.records
            if r.sensor == sid and r.t > since.wall
        }
    )


def _delays(rig: Rig, since: Mark, pattern: re.Pattern[str]) -> list[float]:
    """The retry delays the agent logged since `since`."""
    with rig.log_path.open("rb") as log:
        log.seek(since.log)
        text = log.read().decode(errors="replace")
    return [float(found.group(1)) for found in pattern.finditer(text)]


def _growing(delays: Sequence[float]) -> bool:
    """Backoff: each delay at least the one before (a cap holds them), the last the longest."""
    return all(b >= a for a, b in itertools.pairwise(delays)) and delays[-1] > delays[0]


# -- the checks at the end ----------------------------------------------------------------------


def _check_no_false_alarms(observer: Observer, windows: Sequence[Window]) -> None:
    """Only sensors that were faulted raised sensor_fault (a sleeping PMS5003 or a busy
    neighbour must not), and each of them is back."""
    faulted = set().union(*(w.victims for w in windows))
    alarms = {
        sid
        for pack in observer.events()
        for sid, group in pack.subjects().items()
        if group.get("event") == "sensor_fault"
    }
    assert alarms <= faulted, f"sensor_fault for sensors never faulted: {alarms - faulted}"
    for sid in faulted:
        assert _latest(observer, sid) is True, f"{sid} is not available at the end"


def _check_periods(rig: Rig, windows: Sequence[Window], started: float, stopped: float) -> None:
    """Every sensor keeps its period: within each fault's window, and over the whole run,
    counting only intervals outside the sensor's own faults."""
    times = _reading_times(rig.observer)
    periods = {sid: _configured_period(sensor) for sid, sensor in rig.sensors.items()}
    problems: list[str] = []
    checked: set[str] = set()
    for window in windows:
        for sid, period in periods.items():
            if sid in window.victims:
                continue
            gaps = _healthy_intervals(times[sid], window.start, window.end, windows, sid, period)
            if len(gaps) < MIN_INTERVALS:
                continue
            checked.add(sid)
            median = statistics.median(gaps)
            print(
                f"  during {window.kind:9} of {window.sensor:8}: {sid:8} median "
                f"{median:.3f} s over {len(gaps):3} intervals (period {period:g} s)"
            )
            if abs(median - period) > TOLERANCE * period:
                problems.append(f"{sid} during {window.kind} of {window.sensor}: {median:.3f} s")
    for sid, period in periods.items():
        gaps = _healthy_intervals(times[sid], started, stopped, windows, sid, period)
        assert len(gaps) >= MIN_INTERVALS, f"{sid}: {len(gaps)} intervals outside its faults"
        median = statistics.median(gaps)
        print(f"  whole run: {sid:8} median {median:.3f} s, mean {statistics.mean(gaps):.3f} s")
        if abs(median - period) > TOLERANCE * period:
            problems.append(f"{sid} over the run: {median:.3f} s for a period of {period:g} s")
    assert not problems, f"periods off by more than {TOLERANCE:.0%}: {problems}"
    assert checked, "no sensor could be judged during any fault"


def _reading_times(observer: Observer) -> dict[str, list[float]]:
    found: dict[str, set[float]] = {}
    for message in observer.telemetry().values():
        for record in message.records:
            found.setdefault(record.sensor, set()).add(record.t)
    return {sid: sorted(ts) for sid, ts in found.items()}


def _healthy_intervals(
    times: Sequence[float],
    start: float,
    end: float,
    windows: Sequence[Window],
    sid: str,
    period: float,
) -> list[float]:
    """Intervals between `sid`'s consecutive readings within [start, end] that do not touch
    one of its own faults (nor the periods just after it)."""
    own = [(w.start, w.end + SETTLING_PERIODS * period) for w in windows if sid in w.victims]
    return [
        b - a
        for a, b in itertools.pairwise(times)
        if start <= a and b <= end and not any(a < hi and b > lo for lo, hi in own)
    ]


def _configured_period(sensor: BoundSensor) -> float:
    """How often a sensor of the rig gives readings: a Modbus device's poll period; a polled
    serial sensor's poll interval (if slower than it measures); else how often the emulator
    measures or advertises."""
    spec: SensorSpec = sensor.spec
    if spec.family == "modbus":
        return _modbus_options(sensor).period_s
    polled = spec.options.get("poll_interval_s")
    if isinstance(polled, int | float) and spec.options.get("mode") != "active":
        return max(spec.period_s, float(polled))
    return spec.period_s


async def _check_nothing_lost(observer: Observer, summary: Mapping[str, object]) -> None:
    accepted = summary["accepted"]
    assert isinstance(accepted, int)
    await wait_until(
        lambda: observer.readings_total() >= accepted,
        timeout_s=10.0,
        what=f"all {accepted} accepted readings at the observer",
    )
    assert observer.readings_total() == accepted
    assert (summary["spooled_readings"], summary["spooled_messages"]) == (0, 0)
    assert summary["dropped_readings"] == 0
    assert observer.failures == []
    assert observer.differing_duplicates() == []
    assert not observer.repeated_readings()


def _print_figures(rig: Rig, windows: Sequence[Window]) -> None:
    print(f"\nsensor faults on rig {rig.spec.name}:")
    for w in windows:
        if not w.victims:
            print(f"  {w.sensor:8} {w.kind:9} counted, the sensor stayed available")
            continue
        delays = ", ".join(f"{d:g}" for d in w.delays) or "-"
        print(
            f"  {w.sensor:8} {w.kind:9} noticed after {w.detected_s:5.1f} s, back "
            f"{w.recovered_s:5.1f} s after the clear; retry delays {delays}"
        )
