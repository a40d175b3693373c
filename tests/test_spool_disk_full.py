"""A full disk is an alarm, not a crash: the spool and the sender on a real, really full tmpfs.

Each test mounts a small tmpfs for the state directory (root only), fills it
with a filler file until the kernel answers ENOSPC, checks that nothing raises
out of the paths that must not raise and nothing committed is lost, then
deletes the filler and checks that everything continues and the database is
intact.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.identity import load_identity
from agent.mqtt import SessionSettings
from agent.spool import Spool, SpoolFull
from agent.tls import client_context
from agent.uplink import OutboxSender, Uplink
from drivers.base import TIME_SYNCED, TIME_UNSYNCED, Reading
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill it needs root"),
]

TOPIC = "citygate/gw-a/telemetry"


class SmallDisk:
    """A 2 MiB tmpfs and a filler file that takes every free block."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> None:
        with self.filler.open("wb", buffering=0) as out:
            while True:
                try:
                    out.write(b"\0" * 4096)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    return

    def make_room(self, nbytes: int) -> None:
        os.truncate(self.filler, max(0, self.filler.stat().st_size - nbytes))

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    root = tmp_path / "state"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], check=True)
    try:
        yield SmallDisk(root)
    finally:
        done = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if done.returncode != 0:  # a file left open: detach the mount anyway, then fail
            subprocess.run(["umount", "--lazy", str(root)], check=True)
            pytest.fail(f"the tmpfs was still in use at the end of the test: {done.stderr}")


def _readings(n: int, start: int = 0) -> list[Reading]:
    return [
        Reading("air_1", "pm2_5", float(start + i), "ug/m3", 1.76e9 + start + i) for i in range(n)
    ]


def _build(readings: Sequence[Reading], seq: int) -> tuple[str, bytes]:
    return TOPIC, f"{seq}:{len(readings)}".encode()


# The default budget: its write-ahead log (a sixteenth of it) is still growing in these
# tests, so every write after `fill` needs room. A small budget's log wraps within a few
# transactions, and then reuses its own blocks: small writes go through on a full disk.
def _spool(disk: SmallDisk, budget: int = 64 << 20, memory_max: int = 50_000) -> Spool:
    return Spool(
        disk.root / "spool.sqlite",
        disk.root / "seq",
        budget_bytes=budget,
        memory_max_readings=memory_max,
    )


def _integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def _spooled(spool: Spool) -> int:
    """Readings in the spool: committed ones plus those inside unacknowledged messages."""
    return spool.pending_readings + sum(r.readings for r in spool.outbox(limit=10_000))


def test_full_disk_refuses_writes_keeps_everything_and_recovers_intact(disk: SmallDisk) -> None:
    spool = _spool(disk, memory_max=1000)
    spool.add(_readings(60))
    spool.commit()
    for _ in range(8):
        spool.pack(5, _build)
    seqs = [row.seq for row in spool.outbox()]
    assert (spool.pending_readings, len(seqs)) == (20, 8)
    disk.fill()

    spool.add(_readings(1500, start=100))  # more than memory holds: the oldest 500 go
    with pytest.raises(SpoolFull, match="full"):
        spool.commit()
    assert spool.disk_full
    assert (spool.stats().buffered, spool.memory_dropped) == (1000, 500)
    with pytest.raises(SpoolFull):
        spool.pack(5, _build)
    with pytest.raises(SpoolFull):
        spool.ack(seqs[:2])
    assert (spool.pending_readings, spool.pending_messages) == (20, 8)
    health_seq = spool.take_seq()  # the seq file has a block reserved: health still gets one
    assert spool.disk_full

    disk.free()
    assert spool.commit() == 1000
    assert not spool.disk_full
    assert spool.ack(seqs[:2]) == 2
    row = spool.pack(5, _build)
    assert row is not None
    assert row.seq > health_seq
    assert _spooled(spool) == 60 + 1000 - 10  # minus the two acknowledged messages
    spool.close()
    assert _integrity(disk.root / "spool.sqlite") == "ok"
    spool = _spool(disk)
    assert _spooled(spool) == 1050
    assert spool.take_seq() > row.seq
    spool.close()


def test_a_seq_file_that_cannot_grow_hands_out_no_number_it_does_not_cover(
    disk: SmallDisk,
) -> None:
    spool = _spool(disk)
    spool.add(_readings(10))
    spool.commit()
    disk.fill()  # before the first pack: the seq file has no block reserved yet
    with pytest.raises(SpoolFull):
        spool.pack(5, _build)
    with pytest.raises(SpoolFull):
        spool.take_seq()
    assert spool.disk_full
    assert spool.pending_readings == 10
    disk.free()
    row = spool.pack(5, _build)
    assert row is not None
    # the file on disk must cover every number handed out, or a crash could reissue one
    assert int((disk.root / "seq").read_text()) > row.seq
    spool.close()


def test_budget_enforcement_that_cannot_write_is_logged_not_raised(
    disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    probe = _spool(disk)
    probe.add(_readings(100))
    probe.commit()
    used = probe.stats().bytes_used
    probe.close()
    spool = _spool(disk, budget=used + 8192)
    disk.fill()
    spool.add(_readings(1500, start=100))  # over the budget once written
    with caplog.at_level(logging.WARNING, logger="agent.spool"):
        for _ in range(100):  # free a page at a time until just this commit fits
            try:
                written = spool.commit()
                break
            except SpoolFull:
                disk.make_room(4096)
        else:
            pytest.fail("the commit never fitted")
    assert written == 1500
    assert any("keeping the byte budget failed" in r.getMessage() for r in caplog.records)
    assert spool.pending_readings == 1600  # nothing dropped: the drop could not be written
    disk.free()
    spool.add(_readings(1))
    spool.commit()  # the next write drops down to the budget
    stats = spool.stats()
    assert stats.bytes_used <= used + 8192
    assert stats.dropped_readings + stats.readings == 1601
    spool.close()
    assert _integrity(disk.root / "spool.sqlite") == "ok"


def test_sender_keeps_acks_it_cannot_delete_and_deletes_them_once_the_disk_frees(
    disk: SmallDisk, lab: LabFiles, broker: LabBroker, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = lab.clients["gw-a"]
    identity = load_identity(key, cert, lab.ca_cert)
    spool = _spool(disk)
    spool.add(_readings(70))
    spool.commit()
    spool.pack_ready(1, _build, partial=True)  # more messages than one group of acks
    disk.fill()
    uplink = Uplink(
        SessionSettings(
            host="localhost",
            port=broker.port,
            client_id="gw-a",
            tls=client_context(identity),
            connect_timeout_s=3.0,
        ),
        Backoff(0.1, 1.0),
        status_topic="citygate/gw-a/status",
        online=b"online",
        offline=b"offline",
    )
    sender = OutboxSender(spool, uplink, window=4, backlog_rate=1000.0)

    async def scenario() -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(uplink.run()), group.create_task(sender.run())]
            async with asyncio.timeout(10):
                await sender.drained()  # every message acknowledged by the broker
            assert uplink.counters.published == 70
            assert spool.pending_messages == 70  # none deleted: the disk refused
            assert spool.disk_full
            assert not any(task.done() for task in tasks)
            disk.free()
            sender.wake()
            async with asyncio.timeout(10):
                while spool.pending_messages:
                    await asyncio.sleep(0.02)
            for task in tasks:
                task.cancel()

    with caplog.at_level(logging.ERROR, logger="agent.uplink"):
        asyncio.run(scenario())
    assert any("cannot delete" in r.getMessage() for r in caplog.records)
    assert uplink.counters.published == 70  # acknowledged rows were not sent again
    assert not spool.disk_full
    spool.close()
    assert _integrity(disk.root / "spool.sqlite") == "ok"


def test_dating_refused_by_a_full_disk_is_done_by_the_next_commit(disk: SmallDisk) -> None:
    spool = Spool(disk.root / "spool.sqlite", disk.root / "seq", budget_bytes=1 << 20, boot_id="b")
    boot_time = [
        Reading("air_1", "pm2_5", float(i), "ug/m3", 100.0 + i, TIME_UNSYNCED) for i in range(6)
    ]
    spool.add(boot_time[:5])
    spool.commit()
    disk.fill()
    with pytest.raises(SpoolFull):
        spool.correct_times(1_800_000_000.0)
    assert spool.pending_unsynced == 5
    spool.add(boot_time[5:])
    with pytest.raises(SpoolFull):
        spool.commit()
    disk.free()
    assert spool.commit() == 1
    assert spool.pending_unsynced == 0
    got: list[Reading] = []

    def keep(readings: Sequence[Reading], seq: int) -> tuple[str, bytes]:
        got.extend(readings)
        return _build(readings, seq)

    spool.pack_ready(100, keep, partial=True)
    assert [(r.time, r.time_quality) for r in got] == [
        (1_800_000_100.0 + i, TIME_SYNCED) for i in range(6)
    ]
    spool.close()
