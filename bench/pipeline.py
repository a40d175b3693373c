"""Throughput benchmark of the telemetry path: spool -> packer -> mTLS MQTT 5 -> mosquitto.

It uses the agent's own parts (DESIGN.md §2-§3): `Spool` (SQLite, WAL,
synchronous=FULL), `Packer` (SenML CBOR in a COSE_Sign1, Ed25519), `Uplink` and
`OutboxSender` over a real mosquitto started by `LabBroker` with a throwaway
lab PKI. Two phases run in one process, each on a fresh spool:

1. limit: the same readings through add, commit and pack only (no network);
2. end to end: an asyncio TaskGroup with the uplink, the outbox sender and a
   producer that adds readings in ticks of 1000, commits, packs full batches,
   wakes the sender and yields; the clock runs from the first add to the moment
   the outbox is drained (every message acknowledged by a PUBACK).

It prints figures and the targets next to them; it never passes or fails on
time. Run: `.venv/bin/python bench/pipeline.py [--json] [--readings N]
[--batch N] [--inflight N]`.

Trusts: nothing from outside; every key, certificate and file is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.backoff import Backoff
from agent.identity import Identity, load_identity
from agent.mqtt import SessionSettings
from agent.service import Packer, topics
from agent.spool import Spool
from agent.tls import client_context
from agent.uplink import OutboxSender, Uplink
from drivers.base import Reading
from provisioning.broker import LabBroker
from provisioning.pki import make_lab_pki

GATEWAY = "bench-gw"
PREFIX = "citygate"
TICK = 1000  # readings added per producer tick
SEED = 20_260_501
BUDGET_BYTES = 1 << 30  # no drops: the benchmark measures throughput, not the drop policy
CONNECT_TIMEOUT_S = 15.0
DRAIN_TIMEOUT_S = 600.0  # a guard against a hang (e.g. refused publishes), not a time limit
T0 = 1_760_000_000.0

#: (sensor, quantity, unit, low, high): one sample per channel per simulated second
CHANNELS: tuple[tuple[str, str, str, float, float], ...] = (
    *(
        (f"air_{n}", quantity, unit, low, high)
        for n in range(1, 5)
        for quantity, unit, low, high in (
            ("pm1", "ug/m3", 0.0, 40.0),
            ("pm2_5", "ug/m3", 0.0, 80.0),
            ("pm10", "ug/m3", 0.0, 120.0),
            ("temperature", "Cel", -10.0, 35.0),
            ("humidity", "%RH", 10.0, 100.0),
        )
    ),
    *(
        (f"bin_{n}", quantity, unit, low, high)
        for n in range(1, 5)
        for quantity, unit, low, high in (
            ("distance", "m", 0.05, 1.2),
            ("fill_level", "%", 0.0, 100.0),
            ("battery", "V", 3.3, 4.2),
        )
    ),
)

#: name -> (comparison, value) shown next to the figure; never asserted
TARGETS: dict[str, tuple[str, float]] = {
    "readings_per_s": (">=", 50_000.0),
    "ratio": (">=", 0.5),
    "disk_bytes_written_per_reading": ("<=", 200.0),
    "peak_rss_mb": ("<", 80.0),
}


@dataclass(slots=True)
class Counters:
    """Process-wide counters sampled at the start and end of a phase."""

    wall: float
    cpu: float
    write_bytes: int | None
    wchar: int | None

    @classmethod
    def now(cls) -> Counters:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        io = _proc_io()
        return cls(
            wall=time.perf_counter(),
            cpu=usage.ru_utime + usage.ru_stime,
            write_bytes=io.get("write_bytes"),
            wchar=io.get("wchar"),
        )


@dataclass(slots=True)
class EndToEnd:
    readings: int
    messages: int
    seconds: float
    cpu_s: float
    write_bytes: int | None
    wchar: int | None
    notes: list[str] = field(default_factory=list)


def _proc_io() -> dict[str, int]:
    try:
        text = Path("/proc/self/io").read_text(encoding="ascii")
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): int(value) for key, value in fields}


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def _chunks(total: int) -> Iterator[list[Reading]]:
    """`total` readings in ticks of TICK, the same sequence on every call."""
    rng = random.Random(SEED)
    width = len(CHANNELS)
    for start in range(0, total, TICK):
        chunk: list[Reading] = []
        for i in range(start, min(start + TICK, total)):
            sensor, quantity, unit, low, high = CHANNELS[i % width]
            value = round(low + (high - low) * rng.random(), 2)
            chunk.append(Reading(sensor, quantity, value, unit, T0 + i // width))
        yield chunk


def _open_spool(directory: Path) -> Spool:
    directory.mkdir(parents=True)
    return Spool(directory / "spool.db", directory / "seq", budget_bytes=BUDGET_BYTES)


def limit_phase(directory: Path, identity: Identity, total: int, batch: int) -> float:
    """Seconds to add, commit and pack `total` readings with no network."""
    spool = _open_spool(directory)
    packer = Packer(identity, topics(PREFIX, identity.gateway_id)["telemetry"])
    try:
        start = time.perf_counter()
        for chunk in _chunks(total):
            spool.add(chunk)
            spool.commit()
            spool.pack_ready(batch, packer, partial=False)
        spool.pack_ready(batch, packer, partial=True)
        return time.perf_counter() - start
    finally:
        spool.close()


async def end_to_end_phase(
    directory: Path, identity: Identity, port: int, total: int, batch: int, inflight: int
) -> EndToEnd:
    """Readings from first add to last PUBACK through the agent's uplink and sender."""
    names = topics(PREFIX, identity.gateway_id)
    spool = _open_spool(directory)
    packer = Packer(identity, names["telemetry"])
    settings = SessionSettings(
        host="localhost",
        port=port,
        client_id=identity.gateway_id,
        tls=client_context(identity),
        inflight=inflight,
    )
    uplink = Uplink(
        settings,
        Backoff(0.1, 1.0),
        status_topic=names["status"],
        online=b'{"state":"online","gateway":"bench-gw"}',
        offline=b'{"state":"offline","gateway":"bench-gw"}',
    )
    sender = OutboxSender(spool, uplink, window=inflight)

    async def produce() -> EndToEnd:
        before = Counters.now()
        for chunk in _chunks(total):
            spool.add(chunk)
            spool.commit()
            if spool.pack_ready(batch, packer, partial=False):
                sender.wake()
            await asyncio.sleep(0)
        spool.pack_ready(batch, packer, partial=True)
        sender.wake()
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await sender.drained()
        after = Counters.now()
        stats = spool.stats()
        acked = total - stats.dropped_readings - stats.readings - stats.buffered
        return EndToEnd(
            readings=acked,
            messages=uplink.counters.published,
            seconds=after.wall - before.wall,
            cpu_s=after.cpu - before.cpu,
            write_bytes=_delta(before.write_bytes, after.write_bytes),
            wchar=_delta(before.wchar, after.wchar),
        )

    try:
        async with asyncio.TaskGroup() as group:
            uplink_task = group.create_task(uplink.run(), name="uplink")
            sender_task = group.create_task(sender.run(), name="sender")
            # the clock starts once the session is up: the TLS handshake is not throughput
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await uplink.session()
            result = await group.create_task(produce(), name="producer")
            sender_task.cancel()
            await uplink.say_goodbye()
            uplink_task.cancel()
    finally:
        spool.close()
    counters = uplink.counters
    if counters.connects != 1 or counters.refused:
        result.notes.append(
            f"uplink: {counters.connects} connect(s), {counters.connect_failures} failed, "
            f"{counters.refused} refused publish(es); last error {counters.last_error!r}"
        )
    return result


def run(total: int, batch: int, inflight: int, notes: list[str]) -> dict[str, object]:
    """Both phases; the figures as a dict, with `notes` (the same list) among them."""
    with tempfile.TemporaryDirectory(prefix="citygate-bench-") as tmp:
        root = Path(tmp)
        lab = make_lab_pki(root / "pki", clients=[GATEWAY, "verifier"])
        cert, key = lab.clients[GATEWAY]
        identity = load_identity(key, cert, lab.ca_cert)
        limit_s = limit_phase(root / "spool-limit", identity, total, batch)
        with LabBroker(
            root / "broker",
            ca_cert=lab.ca_cert,
            server_cert=lab.server_cert,
            server_key=lab.server_key,
        ) as broker:
            threads_before = set(threading.enumerate())
            e2e = asyncio.run(
                end_to_end_phase(root / "spool-e2e", identity, broker.port, total, batch, inflight)
            )
            left = [t.name for t in threading.enumerate() if t not in threads_before]
            if left:
                notes.append(f"threads left running: {left}")
    notes.extend(e2e.notes)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    readings_per_s = e2e.readings / e2e.seconds
    limit_per_s = total / limit_s
    per_reading: float | None = None
    if e2e.write_bytes is None:
        notes.append("/proc/self/io is unreadable: disk bytes written are unknown")
    else:
        per_reading = e2e.write_bytes / max(e2e.readings, 1)
    if e2e.wchar is not None:
        notes.append(
            f"write() syscall bytes (wchar, incl. TLS socket): "
            f"{e2e.wchar / max(e2e.readings, 1):.1f} per reading"
        )
    if e2e.readings != total:
        notes.append(f"only {e2e.readings} of {total} readings were acknowledged")
    return {
        "readings_per_s": round(readings_per_s, 1),
        "limit_readings_per_s": round(limit_per_s, 1),
        "ratio": round(readings_per_s / limit_per_s, 3),
        "cpu_s_per_1k_readings": round(e2e.cpu_s / max(e2e.readings, 1) * 1000, 5),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "disk_bytes_written_per_reading": None if per_reading is None else round(per_reading, 1),
        "batch_size": batch,
        "inflight": inflight,
        "readings": e2e.readings,
        "messages": e2e.messages,
        "seconds": round(e2e.seconds, 3),
        "limit_seconds": round(limit_s, 3),
        "notes": notes,
    }


def _show(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _human(result: dict[str, object], notes: list[str]) -> str:
    lines = []
    for name, value in result.items():
        if name == "notes":
            continue
        target = TARGETS.get(name)
        wanted = f"target {target[0]} {target[1]:,g}" if target else ""
        lines.append(f"{name:<32}{_show(value):>14}   {wanted}".rstrip())
    lines.extend(f"note: {note}" for note in notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--readings", type=int, default=200_000, help="readings per phase")
    parser.add_argument("--batch", type=int, default=500, help="readings per signed message")
    parser.add_argument("--inflight", type=int, default=32, help="unacknowledged messages")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.readings, args.batch, args.inflight) < 1:
        parser.error("--readings, --batch and --inflight must be at least 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    notes: list[str] = []
    result = run(args.readings, args.batch, args.inflight, notes)
    print(json.dumps(result) if args.json else _human(result, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
