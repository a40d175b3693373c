"""Footprint of the real agent: idle CPU, memory, flash bytes per reading, backlog drain.

Each phase runs `citygate run` as a subprocess on a fresh HIL rig
(`hil_tests.rig.Rig`: emulated sensors, a lab mosquitto with mutual TLS, a
verifying observer) with the agent's own defaults (the rig's lab tuning is
taken away), and watches it only from outside: `/proc` through
`hil_tests.observe.ProcessProbe` (CPU time, RSS, `write_bytes`) and the
observer (what reached the broker, verified, with arrival times).

1. idle: the default emulated rig's sensors, each read every 10 s (PMS5003
   active and passive, Modbus RTU and TCP polled with period_s = 10, a
   RuuviTag advertising every 10 s). After a warm-up, a window of `--idle-s`:
   CPU of one core, RSS, bytes written per reading.
2. busy: the same figures on the rig of `--rig` (default: the shipped
   emulated rig, every sensor at 1 or 2 Hz).
3. drain: before the agent starts, a backlog of `--backlog` readings goes
   into its spool through the agent's own `Spool` and `Packer`, in messages
   of 500 (what an outage leaves in the outbox); then the agent starts, with
   the broker up and the live sensors of `--rig`. The drain time runs from
   the agent's start to the arrival of the last backlog message at the
   observer; the latency of a fresh reading is its arrival at the observer
   minus its own timestamp, for readings taken after the agent started and
   before the backlog was through. Once per `--drain-rates` value of
   broker.backlog_messages_per_s.

Beside them, in this process, the bytes that one spool transaction of each
kind (commit, pack, delete after PUBACK, seq) writes on the same filesystem:
the fixed cost that makes a slow rig pay more flash per reading.

`write_bytes` counts what reaches the block layer, so the rigs' directories
(the agent's state dir and spool) are made under `--dir` (default
/var/tmp); the filesystem is printed, and a tmpfs there is reported in the
notes. `--set SECTION.KEY=VALUE` changes one gateway.toml key for every
agent run. Figures and targets are printed side by side; nothing passes or
fails (STYLE.md, habit 12). Run from the repository root:
`.venv/bin/python -m bench.footprint [--json] [--idle-s 60] [--busy-s 30]
[--backlog 1000000] [--drain-rates 50,200] [--set spool.commit_interval_s=5]`.

Trusts: nothing from outside; every key, certificate, file and process is
its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.identity import load_identity
from agent.service import Packer, topics
from agent.spool import Spool
from agent.uplink import BACKLOG_RATE as DEFAULT_BACKLOG_RATE
from drivers.base import Reading
from hil_tests.observe import ProcessProbe, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec, load_rig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RIG = REPO / "hil_tests" / "rigs" / "emulated.toml"
MIB = 1 << 20
SAMPLE_S = 0.5  # /proc sampling period (RSS peaks, drain progress)
FIRST_READINGS_S = 90.0  # a guard against a rig that never delivers, not a time limit
BACKLOG_BATCH = 500  # readings per message: the agent's default spool.batch_max_readings
BACKLOG_SPAN_S = 10 * 3600.0  # the outage the backlog stands for, ending before the build
BACKLOG_CHUNK = 10_000  # readings per spool commit while building the backlog
SEED = 20_260_502
DEFAULT_BUDGET_BYTES = 64 * MIB  # the agent's default spool.budget_bytes

#: the default emulated rig (hil_tests/rigs/emulated.toml) with every sensor read every 10 s
IDLE_RIG = """\
[rig]
kind = "emulated"
name = "emulated-every-10s"
description = "the default emulated rig, every sensor read every 10 s"
faults = []
first_reading_s = 60.0

[sensors.air_1]
family = "pms5003"
transport = "serial"
seed = 1
period_s = 10.0
options = { mode = "active", silence_timeout_s = 30.0 }

[sensors.air_2]
family = "pms5003"
transport = "serial"
seed = 2
period_s = 10.0
options = { mode = "passive", poll_interval_s = 10.0, silence_timeout_s = 30.0 }

[sensors.meter_1]
family = "modbus"
transport = "modbus-rtu"
profile = "sdm120"
unit_id = 1
seed = 3
options = { baud = 9600, period_s = 10.0 }

[sensors.bin_3]
family = "modbus"
transport = "modbus-tcp"
profile = "urm13"
seed = 4
options = { period_s = 10.0, bin = { empty_distance_m = 2.5, full_distance_m = 0.5 } }

[sensors.tag_1]
family = "ruuvi"
transport = "ble"
address = "C4:7C:8D:6A:11:01"
seed = 5
period_s = 10.0
"""

#: (sensor, quantity, unit, low, high): the channels of the backlog, as the rig's sensors have
BACKLOG_CHANNELS: tuple[tuple[str, str, str, float, float], ...] = (
    ("air_1", "pm1", "ug/m3", 0.0, 40.0),
    ("air_1", "pm2_5", "ug/m3", 0.0, 80.0),
    ("air_1", "pm10", "ug/m3", 0.0, 120.0),
    ("air_2", "pm1", "ug/m3", 0.0, 40.0),
    ("air_2", "pm2_5", "ug/m3", 0.0, 80.0),
    ("air_2", "pm10", "ug/m3", 0.0, 120.0),
    ("meter_1", "voltage", "V", 220.0, 245.0),
    ("meter_1", "current", "A", 0.0, 16.0),
    ("meter_1", "active_power", "W", 0.0, 3600.0),
    ("meter_1", "frequency", "Hz", 49.8, 50.2),
    ("meter_1", "energy_import", "J", 1e8, 2e8),
    ("bin_3", "distance", "m", 0.5, 2.5),
    ("bin_3", "fill_level", "%", 0.0, 100.0),
    ("tag_1", "temperature", "Cel", -10.0, 35.0),
    ("tag_1", "humidity", "%RH", 10.0, 100.0),
    ("tag_1", "pressure", "Pa", 97_000.0, 104_000.0),
    ("tag_1", "battery", "V", 2.5, 3.2),
)

#: config sections -> keys -> values, as `Rig.start_agent(tuning=)` takes them
Tuning = Mapping[str, Mapping[str, object]]

#: name -> (comparison, value): the issue's targets, shown next to the figures, never asserted
TARGETS: dict[str, tuple[str, float]] = {
    "idle_cpu_percent": ("<", 1.0),
    "steady_rss_mb": ("<", 60.0),
    "flash_bytes_per_reading": ("<=", 100.0),  # at the idle and at the busy rig
    "drain_s": ("<", 60.0),
    "fresh_latency_p99_s": ("<", 5.0),
}


@dataclass(frozen=True)
class Window:
    """What the agent cost over one steady-state window, seen from outside."""

    seconds: float
    cpu_s: float
    rss_bytes: int  # at the end of the window
    peak_rss_bytes: int  # highest sample in the window
    write_bytes: int
    log_bytes: int  # of write_bytes at most this many went to the agent's log file
    readings: int  # readings taken in the window (their own timestamps), at the observer
    messages: int  # telemetry messages that arrived in the window
    payload_bytes: int  # their signed bytes: what the spool must hold at the least
    payload_readings: int  # the readings in them

    def figures(self) -> dict[str, object]:
        readings = max(self.readings, 1)
        return {
            "seconds": round(self.seconds, 1),
            "cpu_percent": round(100 * self.cpu_s / self.seconds, 3),
            "rss_mb": round(self.rss_bytes / MIB, 1),
            "peak_rss_mb": round(self.peak_rss_bytes / MIB, 1),
            "readings_per_s": round(self.readings / self.seconds, 2),
            "messages_per_min": round(60 * self.messages / self.seconds, 1),
            "write_bytes": self.write_bytes,
            "write_bytes_per_s": round(self.write_bytes / self.seconds),
            "flash_bytes_per_reading": round(self.write_bytes / readings, 1),
            "flash_bytes_per_message": round(self.write_bytes / max(self.messages, 1)),
            "payload_bytes_per_reading": round(
                self.payload_bytes / max(self.payload_readings, 1), 1
            ),
            "log_bytes": self.log_bytes,
            "readings": self.readings,
            "messages": self.messages,
        }


@dataclass
class DrainTally:
    """The drain as the observer sees it, scanned incrementally from its arrivals.

    Backlog messages are those with seq <= `backlog_last_seq` (built before the
    agent started); a fresh reading is one in a later message taken at or after
    `agent_start` (wall clock).
    """

    backlog_last_seq: int
    agent_start: float
    wall_offset: float  # time.time() - time.monotonic(): arrival times to wall clock
    backlog_messages: int = 0
    backlog_readings: int = 0
    first_backlog_at: float | None = None
    last_backlog_at: float | None = None
    fresh: list[tuple[float, float]] = field(default_factory=list)  # (taken, latency)
    newest_fresh: float = 0.0  # the newest timestamp of a fresh reading so far
    duplicates: int = 0
    _seen: set[int] = field(default_factory=set)
    _next: int = 0

    def scan(self, rig: Rig) -> None:
        arrivals = rig.observer.arrivals
        for arrival in arrivals[self._next :]:
            message = arrival.message
            if arrival.kind != "telemetry" or message is None:
                continue
            if message.seq in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(message.seq)
            at = arrival.at + self.wall_offset
            if message.seq <= self.backlog_last_seq:
                self.backlog_messages += 1
                self.backlog_readings += len(message.records)
                self.first_backlog_at = self.first_backlog_at or at
                self.last_backlog_at = at
                continue
            taken = [r.t for r in message.records if r.t >= self.agent_start]
            self.fresh.extend((t, at - t) for t in taken)
            self.newest_fresh = max(self.newest_fresh, *taken, 0.0)
        self._next = len(arrivals)


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def _filesystem(path: Path) -> str:
    """'TYPE on SOURCE (mount point)' of the mount holding `path`, from /proc/self/mounts."""
    best = ("", "?", "?")
    resolved = str(path.resolve())
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        source, point, kind = line.split()[:3]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, kind, source)
    return f"{best[1]} on {best[2]} ({best[0]})"


# -- the agent on a rig -------------------------------------------------------------------


def _rig(spec: RigSpec, workdir: Path) -> Rig:
    """A rig whose agent runs with its own defaults: the HIL lab tuning (small batches, a
    health report every second, quick reconnects) is taken away."""
    rig = Rig(spec, workdir)
    rig.tuning = {}
    return rig


def _delivery_s(tuning: Tuning) -> float:
    """The longest a reading waits in the agent before it is sent: a commit interval and a
    batch interval (the agent's defaults, 0.5 and 2 s, unless --set changes them)."""
    spool = tuning.get("spool", {})
    commit, batch = spool.get("commit_interval_s", 0.5), spool.get("batch_interval_s", 2.0)
    if not isinstance(commit, int | float) or not isinstance(batch, int | float):
        raise ValueError("spool.commit_interval_s and spool.batch_interval_s are numbers")
    return float(commit + batch)


def _latest_reading(rig: Rig) -> float:
    """The newest timestamp of a reading the observer has (0 before the first)."""
    return max((r.t for m in rig.observer.telemetry().values() for r in m.records), default=0.0)


async def _every_sensor_delivers(rig: Rig, delivery_s: float) -> None:
    await wait_until(
        lambda: set(rig.sensors) <= set(rig.observer.readings_by_sensor()),
        timeout_s=max(rig.spec.first_reading_s, FIRST_READINGS_S) + delivery_s,
        what=f"readings of every sensor of the rig ({', '.join(rig.sensors)})",
        poll_s=0.5,
    )


def _log_size(rig: Rig) -> int:
    try:
        return rig.log_path.stat().st_size
    except FileNotFoundError:
        return 0


async def _window(rig: Rig, probe: ProcessProbe, seconds: float, delivery_s: float) -> Window:
    """Sample the agent over `seconds`; then count the readings taken in that time, once a
    later one has arrived (messages are packed oldest reading first)."""
    wall_start, log_start = time.time(), _log_size(rig)
    first = probe.sample()
    peak = first.rss_bytes
    while (last := probe.sample()).at - first.at < seconds:
        peak = max(peak, last.rss_bytes)
        await asyncio.sleep(min(SAMPLE_S, seconds - (last.at - first.at)))
    peak = max(peak, last.rss_bytes)
    wall_end, log_end = time.time(), _log_size(rig)
    start_mono, end_mono = first.at, last.at
    await wait_until(
        lambda: _latest_reading(rig) >= wall_end,
        timeout_s=FIRST_READINGS_S + delivery_s,
        what="a reading taken after the window",
        poll_s=0.5,
    )
    telemetry = rig.observer.telemetry()
    arrived = {
        (a.message.gateway_id, a.message.seq): (len(a.payload), len(a.message.records))
        for a in rig.observer.arrivals
        if a.kind == "telemetry" and a.message is not None and start_mono <= a.at < end_mono
    }
    readings = sum(1 for m in telemetry.values() for r in m.records if wall_start <= r.t < wall_end)
    return Window(
        seconds=last.at - first.at,
        cpu_s=last.cpu_s - first.cpu_s,
        rss_bytes=last.rss_bytes,
        peak_rss_bytes=peak,
        write_bytes=last.write_bytes - first.write_bytes,
        log_bytes=log_end - log_start,
        readings=readings,
        messages=len(arrived),
        payload_bytes=sum(size for size, _ in arrived.values()),
        payload_readings=sum(n for _, n in arrived.values()),
    )


async def steady_phase(
    spec: RigSpec, workdir: Path, tuning: Tuning, warmup_s: float, seconds: float
) -> Window:
    """The agent on `spec` after its first readings and `warmup_s`: one window."""
    async with _rig(spec, workdir) as rig:
        await rig.start_agent(tuning=tuning)
        probe = rig.probe()
        await _every_sensor_delivers(rig, _delivery_s(tuning))
        await asyncio.sleep(warmup_s)
        window = await _window(rig, probe, seconds, _delivery_s(tuning))
        run = await rig.stop_agent()
        if run.returncode != 0:
            raise RuntimeError(f"the agent exited with {run.returncode}:\n{rig.agent_log()}")
        return window


# -- what one spool transaction writes -------------------------------------------------------


def _own_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise ValueError("no write_bytes in /proc/self/io")


def spool_transactions(directory: Path, readings: int = 30, repeat: int = 5) -> dict[str, int]:
    """Bytes written by each kind of spool transaction (median of `repeat`), in this process,
    on the filesystem the rigs use: a commit of `readings` new readings, packing them into
    one message, deleting it after its PUBACK, and a seq for a health report or event. The
    message is a stand-in of the signed size (35 bytes a reading): the bytes count, not the
    signature."""
    costs: dict[str, list[int]] = {"commit": [], "pack": [], "ack": [], "seq": []}
    spool = Spool(directory / "spool.sqlite", directory / "seq", budget_bytes=64 * MIB)
    try:
        for turn in range(repeat + 1):  # the first turn creates the file and its tables
            chunk = [
                Reading(sensor, quantity, low, unit, time.time())
                for sensor, quantity, unit, low, _ in itertools.islice(
                    itertools.cycle(BACKLOG_CHANNELS), readings
                )
            ]
            spool.add(chunk)
            before = _own_write_bytes()
            spool.commit()
            committed = _own_write_bytes()
            row = spool.pack(readings, lambda batch, _seq: ("t", bytes(35 * len(batch))))
            packed = _own_write_bytes()
            spool.ack([row.seq] if row is not None else [])
            acked = _own_write_bytes()
            spool.take_seq()
            if turn:
                costs["commit"].append(committed - before)
                costs["pack"].append(packed - committed)
                costs["ack"].append(acked - packed)
                costs["seq"].append(_own_write_bytes() - acked)
    finally:
        spool.close()
    return {name: int(statistics.median(values)) for name, values in costs.items()}


# -- the backlog --------------------------------------------------------------------------


def _backlog_readings(total: int, end: float) -> Iterator[list[Reading]]:
    """`total` readings over BACKLOG_SPAN_S before `end`, in chunks of BACKLOG_CHUNK."""
    rng = random.Random(SEED)
    width = len(BACKLOG_CHANNELS)
    step = BACKLOG_SPAN_S / total
    start = end - BACKLOG_SPAN_S
    for first in range(0, total, BACKLOG_CHUNK):
        chunk = []
        for i in range(first, min(first + BACKLOG_CHUNK, total)):
            sensor, quantity, unit, low, high = BACKLOG_CHANNELS[i % width]
            value = round(low + (high - low) * rng.random(), 2)
            chunk.append(Reading(sensor, quantity, value, unit, start + i * step))
        yield chunk


def build_backlog(rig: Rig, total: int, budget_bytes: int) -> tuple[int, int, float]:
    """Fill the agent's spool (its path, its seq file) with `total` readings packed in
    messages of BACKLOG_BATCH, as the agent itself leaves them after an outage.
    Returns (messages, highest seq, seconds taken)."""
    cert, key = rig.lab.clients[rig.gateway]
    identity = load_identity(key, cert, rig.lab.ca_cert)
    spool = Spool(
        rig.spool_path, rig.state_dir / f"seq-{identity.kid.hex()}", budget_bytes=budget_bytes
    )
    packer = Packer(identity, topics("citygate", identity.gateway_id)["telemetry"])
    started = time.perf_counter()
    try:
        for chunk in _backlog_readings(total, time.time() - 1.0):
            spool.add(chunk)
            spool.commit()
            spool.pack_ready(BACKLOG_BATCH, packer, partial=False)
        spool.pack_ready(BACKLOG_BATCH, packer, partial=True)
        stats = spool.stats()
        if stats.dropped_readings:
            raise RuntimeError(
                f"the spool budget dropped {stats.dropped_readings} backlog readings: "
                "use a smaller --backlog"
            )
        return stats.messages, spool.outbox_last_seq(), time.perf_counter() - started
    finally:
        spool.close()


@dataclass(frozen=True)
class Drain:
    """One drain of the backlog at one rate, seen from outside."""

    rate: float  # broker.backlog_messages_per_s
    messages: int  # backlog messages built (and all arrived)
    readings: int  # backlog readings at the observer
    build_s: float
    drain_s: float  # agent start -> last backlog message at the observer
    first_s: float  # agent start -> first backlog message at the observer
    latencies: list[float]  # of fresh readings taken during the drain
    seconds: float  # of the /proc samples
    cpu_s: float
    peak_rss_bytes: int
    write_bytes: int
    duplicates: int
    failures: int  # messages that failed verification
    dropped: object  # dropped_readings of the agent's last-run.json

    @property
    def bound_s(self) -> float:
        """The drain time the configured rate allows: messages / rate."""
        return self.messages / self.rate

    def figures(self) -> dict[str, object]:
        p50, p99 = _percentile(self.latencies, 0.5), _percentile(self.latencies, 0.99)
        return {
            "backlog_messages_per_s": self.rate,
            "backlog_readings": self.readings,
            "backlog_messages": self.messages,
            "build_s": round(self.build_s, 1),
            "drain_s": round(self.drain_s, 2),
            "first_backlog_after_s": round(self.first_s, 2),
            "bound_s": round(self.bound_s, 2),
            "ratio_to_bound": round(self.drain_s / self.bound_s, 3),
            "readings_per_s": round(self.readings / self.drain_s),
            "fresh_readings": len(self.latencies),
            "fresh_latency_p50_s": None if p50 is None else round(p50, 3),
            "fresh_latency_p99_s": None if p99 is None else round(p99, 3),
            "fresh_latency_max_s": round(max(self.latencies), 3) if self.latencies else None,
            "cpu_percent": round(100 * self.cpu_s / max(self.seconds, 1e-9), 1),
            "peak_rss_mb": round(self.peak_rss_bytes / MIB, 1),
            "flash_bytes_per_backlog_reading": round(self.write_bytes / max(self.readings, 1), 2),
            "duplicate_copies": self.duplicates,
            "verification_failures": self.failures,
            "dropped_readings": self.dropped,
        }


async def drain_phase(
    spec: RigSpec, workdir: Path, tuning: Tuning, total: int, rate: float
) -> Drain:
    """Build the backlog, start the agent, wait for the backlog at the observer."""
    async with _rig(spec, workdir) as rig:
        budget = tuning.get("spool", {}).get("budget_bytes", DEFAULT_BUDGET_BYTES)
        if not isinstance(budget, int):
            raise ValueError("spool.budget_bytes is a whole number")
        messages, last_seq, build_s = await asyncio.to_thread(build_backlog, rig, total, budget)
        wall_offset = time.time() - time.monotonic()
        agent_start = time.time()
        broker = {**tuning.get("broker", {}), "backlog_messages_per_s": rate}
        await rig.start_agent(tuning={**tuning, "broker": broker})
        probe = rig.probe()
        first = last = probe.sample()
        peak = first.rss_bytes
        tally = DrainTally(last_seq, agent_start, wall_offset)
        deadline = time.monotonic() + max(120.0, 5 * messages / rate)  # a guard against a hang
        while tally.backlog_messages < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {tally.backlog_messages} of {messages} backlog messages arrived\n"
                    + rig.agent_log()[-4000:]
                )
            await asyncio.sleep(SAMPLE_S)
            last = probe.sample()
            peak = max(peak, last.rss_bytes)
            tally.scan(rig)
        done = tally.last_backlog_at or agent_start

        def caught_up() -> bool:  # fresh readings of the drain's last moments have arrived
            tally.scan(rig)
            return tally.newest_fresh >= done

        await wait_until(
            caught_up,
            timeout_s=FIRST_READINGS_S + _delivery_s(tuning),
            what="a fresh reading taken after the drain",
            poll_s=SAMPLE_S,
        )
        run = await rig.stop_agent()
        if run.returncode != 0:
            raise RuntimeError(f"the agent exited with {run.returncode}:\n{rig.agent_log()}")
        failures = len(rig.observer.failures)
    return Drain(
        rate=rate,
        messages=messages,
        readings=tally.backlog_readings,
        build_s=build_s,
        drain_s=done - agent_start,
        first_s=(tally.first_backlog_at or agent_start) - agent_start,
        latencies=[latency for taken, latency in tally.fresh if taken <= done],
        seconds=last.at - first.at,
        cpu_s=last.cpu_s - first.cpu_s,
        peak_rss_bytes=peak,
        write_bytes=last.write_bytes - first.write_bytes,
        duplicates=tally.duplicates,
        failures=failures,
        dropped=(run.summary or {}).get("dropped_readings"),
    )


# -- the run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    directory: Path
    rig: Path
    phases: frozenset[str]
    warmup_s: float
    idle_s: float
    busy_s: float
    backlog: int
    drain_rates: tuple[float, ...]
    tuning: Tuning  # config keys set for every agent (--set); the rest are its defaults


@dataclass
class Result:
    """Everything one run measured; `report()` is the JSON object."""

    state_dir: Path
    state_fs: str
    busy_rig: Path
    tuning: Tuning
    transactions: dict[str, int] = field(default_factory=dict)  # spool_transactions()
    idle: Window | None = None
    busy: Window | None = None
    drains: list[Drain] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def on_disk(self) -> bool:
        """False on a filesystem in memory, where nothing reaches a block device."""
        return not self.state_fs.startswith(("tmpfs", "ramfs"))

    def headline(self) -> dict[str, float | None]:
        """The issue's figures (flash bytes at both rates; the drain at the default rate)."""
        figures: dict[str, float | None] = {}
        if self.idle is not None:
            figures["idle_cpu_percent"] = round(100 * self.idle.cpu_s / self.idle.seconds, 3)
        steady = [w for w in (self.idle, self.busy) if w is not None]
        if steady:
            figures["steady_rss_mb"] = round(max(w.rss_bytes for w in steady) / MIB, 1)
        for name, window in (("idle", self.idle), ("busy", self.busy)):
            if window is not None:
                per_reading = window.write_bytes / max(window.readings, 1)
                counted = round(per_reading, 1) if self.on_disk else None
                figures[f"flash_bytes_per_reading_{name}"] = counted
        if self.drains:
            drain = next((d for d in self.drains if d.rate == DEFAULT_BACKLOG_RATE), None)
            drain = drain or self.drains[0]
            figures["drain_s"] = round(drain.drain_s, 2)
            p99 = _percentile(drain.latencies, 0.99)
            figures["fresh_latency_p99_s"] = None if p99 is None else round(p99, 3)
        return figures

    def report(self) -> dict[str, object]:
        figures = self.headline()
        targets = {name: _target(name) for name in figures}
        ratios = {
            name: None if value is None else round(value / targets[name][1], 3)
            for name, value in figures.items()
        }
        return {
            **figures,
            "targets": {name: list(target) for name, target in targets.items()},
            "ratios": ratios,
            "idle": None if self.idle is None else self.idle.figures(),
            "busy": None if self.busy is None else self.busy.figures(),
            "drains": [drain.figures() for drain in self.drains],
            "spool_transaction_bytes": self.transactions,
            "idle_rig": "hil_tests/rigs/emulated.toml with every sensor read every 10 s",
            "busy_rig": str(self.busy_rig),
            "settings": {section: dict(keys) for section, keys in self.tuning.items()},
            "state_dir": str(self.state_dir),
            "state_fs": self.state_fs,
            "notes": self.notes,
        }


def _target(name: str) -> tuple[str, float]:
    return TARGETS[name.removesuffix("_idle").removesuffix("_busy")]


async def measure(options: Options) -> Result:
    """Every phase asked for, each on its own rig under a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="citygate-footprint-", dir=options.directory) as tmp:
        root = Path(tmp)
        result = Result(root, _filesystem(root), options.rig, options.tuning)
        if not result.on_disk:
            result.notes.append(
                f"{root} is on {result.state_fs}: write_bytes reads 0 there, so the flash "
                "figures are unknown (use --dir on a disk)"
            )
        (root / "idle-rig.toml").write_text(IDLE_RIG)
        result.transactions = spool_transactions(_fresh(root / "transactions"))
        busy_rig = load_rig(options.rig)
        if "idle" in options.phases:
            result.idle = await steady_phase(
                load_rig(root / "idle-rig.toml"),
                root / "idle",
                options.tuning,
                options.warmup_s,
                options.idle_s,
            )
        if "busy" in options.phases:
            result.busy = await steady_phase(
                busy_rig, root / "busy", options.tuning, options.warmup_s, options.busy_s
            )
        for rate in options.drain_rates if "drain" in options.phases else ():
            drain = await drain_phase(
                busy_rig, root / f"drain-{rate:g}", options.tuning, options.backlog, rate
            )
            result.drains.append(drain)
    result.notes.extend(_flash_notes(result.idle, result.busy, result.transactions))
    return result


def _fresh(directory: Path) -> Path:
    directory.mkdir(parents=True)
    return directory


def _flash_notes(
    idle: Window | None, busy: Window | None, transactions: Mapping[str, int]
) -> list[str]:
    """What the flash figures count, and why the idle rig pays more per reading."""
    notes = [
        "write_bytes counts the pages the agent dirtied (SQLite WAL and database, seq file, "
        "its log file); the filesystem's journal and the flash's own write amplification "
        "come on top"
    ]
    if idle is not None and busy is not None:
        i, b = idle.figures(), busy.figures()
        notes.append(
            f"flash: {i['write_bytes_per_s']:,} B/s at {i['readings_per_s']:g} readings/s "
            f"(idle) against {b['write_bytes_per_s']:,} B/s at {b['readings_per_s']:g} "
            f"readings/s (busy): every spool transaction (a commit of new readings each "
            f"spool.commit_interval_s, a message each spool.batch_interval_s or 500 readings, "
            f"the delete of acknowledged messages) appends whole 4 KiB WAL pages and an fsync "
            f"however few readings it carries, so the cost per reading falls as the rate rises; "
            f"the signed messages themselves take {i['payload_bytes_per_reading']:g} (idle) "
            f"and {b['payload_bytes_per_reading']:g} (busy) bytes per reading"
        )
    if transactions:
        each = ", ".join(f"{name} {size:,}" for name, size in transactions.items())
        notes.append(
            f"bytes written by one spool transaction on this filesystem (30 readings): {each}"
        )
    return notes


def _show(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and value.is_integer():
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _human(result: Result) -> str:
    report = result.report()
    lines = [
        f"idle rig: {report['idle_rig']}",
        f"busy and drain rig: {report['busy_rig']}",
        f"agent settings: {report['settings'] or 'its defaults'}",
        f"state dir: {result.state_dir} ({result.state_fs})",
        "",
    ]
    for name, value in result.headline().items():
        comparison, wanted = _target(name)
        ratio = "" if value is None else f"   ratio {value / wanted:.3g}"
        lines.append(f"{name:<30}{_show(value):>12}   target {comparison} {wanted:g}{ratio}")
    sections = [("idle", result.idle), ("busy", result.busy)]
    drains = [(f"drain at {d.rate:g} messages/s", d) for d in result.drains]
    for title, part in [*sections, *drains]:
        if part is not None:
            lines += ["", f"[{title}]"]
            lines += [f"  {name:<34}{_show(value):>12}" for name, value in part.figures().items()]
    if result.transactions:
        lines += ["", "[bytes written by one spool transaction]"]
        lines += [f"  {name:<34}{size:>12,}" for name, size in result.transactions.items()]
    lines += ["", *(f"note: {note}" for note in result.notes)]
    return "\n".join(lines)


def _rates(text: str) -> tuple[float, ...]:
    rates = tuple(float(part) for part in text.split(",") if part.strip())
    if not rates or any(not 0 < rate <= 10_000 for rate in rates):
        raise argparse.ArgumentTypeError("rates are messages per second, 0 < rate <= 10000")
    return rates


def _setting(text: str) -> tuple[str, str, object]:
    """SECTION.KEY=VALUE, the value in TOML (a number, a boolean, a quoted string)."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (sep and dot and section and key):
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not a TOML value ({exc})") from None
    return section, key, parsed


def _tuning(settings: Sequence[tuple[str, str, object]]) -> Tuning:
    tuning: dict[str, dict[str, object]] = {}
    for section, key, value in settings:
        tuning.setdefault(section, {})[key] = value
    return tuning


def _phases(text: str) -> frozenset[str]:
    phases = frozenset(part.strip() for part in text.split(",") if part.strip())
    if not phases or not phases <= {"idle", "busy", "drain"}:
        raise argparse.ArgumentTypeError("phases: a comma-separated subset of idle,busy,drain")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--dir", type=Path, default=Path("/var/tmp"), help="where the rigs' state goes (a disk)"
    )
    parser.add_argument("--rig", type=Path, default=DEFAULT_RIG, help="rig of busy and drain")
    parser.add_argument(
        "--phases",
        type=_phases,
        default=_phases("idle,busy,drain"),
        help="which to run, comma-separated (default: idle,busy,drain)",
    )
    parser.add_argument("--warmup-s", type=float, default=15.0, help="after first readings")
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle window")
    parser.add_argument("--busy-s", type=float, default=30.0, help="busy window")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="readings in the backlog")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_setting,
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a gateway.toml key for every agent run, e.g. spool.commit_interval_s=5 (repeat)",
    )
    parser.add_argument(
        "--drain-rates",
        type=_rates,
        default=(DEFAULT_BACKLOG_RATE,),
        help="broker.backlog_messages_per_s values, comma-separated (default: the agent's)",
    )
    args = parser.parse_args(argv)
    if min(args.idle_s, args.busy_s) <= 0 or args.warmup_s < 0 or args.backlog < 1:
        parser.error("windows must be positive, --warmup-s not negative, --backlog at least 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    options = Options(
        directory=args.dir,
        rig=args.rig,
        phases=args.phases,
        warmup_s=args.warmup_s,
        idle_s=args.idle_s,
        busy_s=args.busy_s,
        backlog=args.backlog,
        drain_rates=args.drain_rates,
        tuning=_tuning(args.settings),
    )
    threads_before = set(threading.enumerate())
    result = asyncio.run(measure(options))
    left = [t.name for t in threading.enumerate() if t not in threads_before]
    if left:
        result.notes.append(f"threads left running: {left}")
    print(json.dumps(result.report()) if args.json else _human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
