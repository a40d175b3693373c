"""The durable spool and outbox on SQLite (WAL): nothing is deleted before its PUBACK.

Data flow (DESIGN.md §2): drivers hand readings to `add` (memory); `commit`
writes the buffered group in one transaction (the loss window on power cut is
the commit interval); `pack` turns the oldest committed readings into one
signed message and, in the same transaction, stores it in the outbox with its
sequence number and deletes those readings; the uplink sends outbox rows and
calls `ack(seq)` only after the broker acknowledged them. A message is signed
once and re-sent byte-identical from its row until acknowledged.

Sequence numbers: `pack` and `take_seq` (for the other signed messages, health
and events) draw from one counter (agent.seq), so seq strictly increases per
key across all topics. The highest number taken is also written to `meta`
(`last_seq`), in the same transaction as the message (or, for `take_seq`, at
once; if the disk refuses, with the next write that succeeds), so a lost seq
file still never repeats a number.

Bounded: the spool has a byte budget. When it is exceeded the *oldest* data
goes first (outbox messages, then readings) and every dropped reading is
counted in `meta`, so health can report it. The oldest messages are also the
ones the uplink sends first after an outage: one dropped while in flight, or
acknowledged but not yet deleted, reached the broker after all, so when its
acknowledgement comes (`ack` finds no row for a seq it remembers dropping) its
readings are taken off the count again, in the same transaction.

A full disk is an alarm, not a crash. Every change is one transaction, so a
refused write (SQLITE_FULL, an I/O error, a seq file that cannot be extended)
changes nothing and is raised as `SpoolFull`; `disk_full` stays True until a
write succeeds again. `commit` keeps what it could not write in memory, but
never more than `memory_max_readings`: beyond that the oldest buffered
readings are dropped and counted in `memory_dropped` (in memory only: the disk
cannot take the count). Dropping data to keep the budget after a successful
write is best effort: its failure is logged, not raised.

Time quality: a reading stamped TIME_UNSYNCED carries CLOCK_BOOTTIME seconds of
the current boot instead of wall time. The spool holds such readings (`pack`
skips them; they count in the budget and in `pending_readings`) until
`correct_times(boot_wall_start)` adds the boot's wall-clock start to them;
after that, `commit` corrects late ones itself. The kernel boot id is kept in
`meta` with them. Held readings of an earlier boot (another boot id) cannot be
corrected: the first write that needs it marks them "before, undated" (never
the open itself, which must work on a full disk), and once `correct_times` has
run they are packed with TIME_BEFORE, dated back from the start of this boot as
far apart as they were taken (`_date_before`): they stay distinct and in order,
and each time is one the reading is known to be older than.

Trusts: its own database file. Readings come from drivers already typed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.seq import SeqCounter
from drivers.base import TIME_BEFORE, TIME_SYNCED, TIME_UNSYNCED, Reading

log = logging.getLogger(__name__)

#: stored only, never packed: a reading of an earlier boot still waiting for `correct_times`
_UNDATED_BEFORE = -2
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: errno values of a filesystem that has no room, as opposed to one that is broken
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: the write-ahead log is checkpointed once it holds this share of the budget (but no fewer
#: than `_WAL_MIN_PAGES` pages: a checkpoint costs two fsyncs)
_WAL_SHARE = 16
_WAL_MIN_PAGES = 16
#: messages dropped by the budget that are remembered, in case their PUBACK still comes
#: (far more than the sender's window and its group of acknowledgements waiting to be deleted)
_DROPPED_REMEMBERED = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    id INTEGER PRIMARY KEY,
    sensor TEXT NOT NULL,
    quantity TEXT NOT NULL,
    unit TEXT NOT NULL,
    UNIQUE (sensor, quantity, unit)
);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    channel INTEGER NOT NULL,
    value REAL NOT NULL,
    t REAL NOT NULL,
    tq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    readings INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
# readings that wait for their time: `tq IN (1, -2)` (TIME_UNSYNCED, _UNDATED_BEFORE)
_SELECT_PACKABLE = (
    "SELECT id, channel, value, t, tq FROM readings WHERE tq NOT IN (1, -2) ORDER BY id LIMIT ?"
)
_DELETE_PACKED = "DELETE FROM readings WHERE id <= ? AND tq NOT IN (1, -2)"

#: build(readings, seq) -> (topic, signed message bytes)
Builder = Callable[[Sequence[Reading], int], tuple[str, bytes]]


class SpoolError(Exception):
    """The spool database cannot be used (corrupt, unreadable, wrong schema)."""


class SpoolFull(SpoolError):
    """The filesystem refused a write (disk full or file size limit); nothing was lost."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    readings: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    buffered: int  # in memory, not yet committed
    readings: int  # committed, not yet packed
    messages: int  # packed, not yet acknowledged
    bytes_used: int
    dropped_readings: int  # by the byte budget, over the life of the file
    next_seq: int
    memory_dropped: int  # from the memory buffer while nothing could be written, this process
    unsynced: int  # committed, held until their time can be trusted
    disk_full: bool


class Spool:
    """One spool file and its sequence counter. Not thread-safe: one owner (the agent loop)."""

    def __init__(
        self,
        path: Path,
        seq_path: Path,
        *,
        budget_bytes: int,
        memory_max_readings: int = 50_000,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._budget = budget_bytes
        self._memory_max = memory_max_readings
        self._boot_id = boot_id if boot_id is not None else _kernel_boot_id()
        self._clock = clock
        self._buffer: list[Reading] = []
        self.accepted = 0  # readings handed to `add` since this process opened the spool
        self.memory_dropped = 0  # readings dropped from the full memory buffer, this process
        self._trimming = False  # dropping from memory since the last successful commit
        self._disk_full = False
        self._seq_unrecorded = False  # a seq was taken that `meta.last_seq` does not cover yet
        self._boot_wall_start: float | None = None  # known once `correct_times` ran
        self._dating_due = False  # `correct_times` could not write; retried after a commit
        self._channels: dict[tuple[str, str, str], int] = {}
        self._channel_rows: dict[int, tuple[str, str, str]] = {}
        self._dropped_messages: OrderedDict[int, int] = OrderedDict()  # seq -> readings
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Debian builds SQLite with SECURE_DELETE, which rewrites every freed page with
            # zeros: a second write of all telemetry. Readings are not secrets (they are
            # sent to the cloud), and flash wear is the budget that matters here.
            self._db.execute("PRAGMA secure_delete=FAST")
            self._bound_wal(budget_bytes)
            self._db.executescript(_SCHEMA)
            self._load_channels()
            last = self._meta("last_seq", -1)
            (readings, held, unsynced) = self._db.execute(
                "SELECT count(*), total(tq IN (1, -2)), total(tq = 1) FROM readings"
            ).fetchone()
            self._pending_readings = int(readings)
            self._held = int(held)
            self._pending_messages = self._count("outbox")
            # "claimed": every stored TIME_UNSYNCED reading is from this boot
            self._boot_claimed = self._meta_text("boot_id") == self._boot_id
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"{path}: cannot open spool: {exc}") from exc
        self._seq = SeqCounter(seq_path, floor=last + 1)
        if unsynced and not self._boot_claimed:  # marked by the first write that needs it
            log.warning(
                "%d reading(s) from an earlier boot never got a trusted time: they will be "
                "sent flagged as from before this boot",
                int(unsynced),
            )

    # -- readings ---------------------------------------------------------

    def add(self, readings: Sequence[Reading]) -> None:
        """Accept readings into memory; `commit` makes them durable."""
        self._buffer.extend(readings)
        self.accepted += len(readings)
        if len(self._buffer) > self._memory_max:
            self._trim_buffer()

    def commit(self) -> int:
        """Write the buffered readings in one transaction; return how many were written.

        Raises SpoolFull when the disk refuses; the readings then stay in memory
        (up to `memory_max_readings`, the oldest dropped beyond it).
        """
        if not self._buffer:
            return 0
        group, self._buffer = self._buffer, []
        claim = False
        try:
            with self._write():
                rows, held = self._rows(group)
                claim = held > 0 and not self._boot_claimed
                if claim:
                    self._claim_boot()
                self._db.executemany(
                    "INSERT INTO readings (channel, value, t, tq) VALUES (?, ?, ?, ?)", rows
                )
        except SpoolError:
            self._buffer[:0] = group  # keep them (`add` bounds them); the caller raises the alarm
            self._forget_uncommitted_channels()
            raise
        self._boot_claimed = self._boot_claimed or claim
        self._trimming = False
        self._pending_readings += len(group)
        self._held += held
        if self._dating_due:
            with _logged("dating the held readings"):
                self._date_held()
        self._keep_budget()
        return len(group)

    # -- time quality -----------------------------------------------------

    def correct_times(self, boot_wall_start: float) -> int:
        """The clock is trusted now: date every held reading; return how many were dated.

        `boot_wall_start` is the wall-clock time at which CLOCK_BOOTTIME was 0
        in this boot. TIME_UNSYNCED readings of this boot become TIME_SYNCED
        at `t + boot_wall_start`; those of an earlier boot become TIME_BEFORE,
        dated back from `boot_wall_start` as far apart as they were taken
        (`_date_before`). Later TIME_UNSYNCED readings are corrected as they
        are committed. Raises SpoolFull if the disk refuses (the dating is
        then retried after the next successful commit).
        """
        self._boot_wall_start = boot_wall_start
        self._dating_due = True
        return self._date_held()

    @property
    def pending_unsynced(self) -> int:
        """Committed readings held until their time can be trusted (`correct_times`)."""
        return self._held

    # -- packing ----------------------------------------------------------

    def pack(self, max_readings: int, build: Builder) -> OutboxRow | None:
        """Turn up to `max_readings` of the oldest committed readings into one outbox row.

        Readings held for their time are skipped. Raises SpoolFull when the
        disk refuses; the readings then stay where they were.
        """
        with self._write():
            rows = self._db.execute(_SELECT_PACKABLE, (max_readings,)).fetchall()
            if not rows:
                return None
            readings = [self._reading(*row[1:]) for row in rows]
            seq = self._take()
            topic, payload = build(readings, seq)
            self._db.execute(
                "INSERT INTO outbox (seq, topic, payload, readings, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (seq, topic, payload, len(readings), self._clock()),
            )
            self._db.execute(_DELETE_PACKED, (rows[-1][0],))
        self._pending_readings -= len(readings)
        self._pending_messages += 1
        self._keep_budget()
        return OutboxRow(seq, topic, payload, len(readings))

    def pack_ready(self, max_readings: int, build: Builder, *, partial: bool) -> int:
        """Pack every full batch, and with `partial` the remainder too; return messages made."""
        made = 0
        while self._pending_readings - self._held >= (1 if partial else max_readings):
            if self.pack(max_readings, build) is None:
                break
            made += 1
        return made

    def take_seq(self) -> int:
        """Reserve the next seq for another signed message (health, events).

        The number comes from the counter `pack` uses. Raises SpoolFull only
        if the seq file must grow and cannot; a number the seq file covers is
        handed out even on a full disk (then `meta.last_seq` follows with the
        next successful write).
        """
        seq = self._take()
        known_full = self._disk_full
        try:
            with self._write():
                pass  # `_write` records the seq in meta.last_seq
        except SpoolError as exc:
            # on a disk known to be full, every health report would say it again
            if not (known_full and isinstance(exc, SpoolFull)):
                log.warning("seq %d is not yet recorded in the spool: %s", seq, exc)
        return seq

    # -- outbox -----------------------------------------------------------

    def outbox(
        self, *, after_seq: int = -1, limit: int = 100, max_seq: int | None = None
    ) -> list[OutboxRow]:
        """Unacknowledged messages with after_seq < seq (<= max_seq), oldest first."""
        rows = self._db.execute(
            "SELECT seq, topic, payload, readings FROM outbox WHERE seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, (1 << 63) - 1 if max_seq is None else max_seq, limit),
        ).fetchall()
        return [OutboxRow(seq, topic, bytes(payload), n) for seq, topic, payload, n in rows]

    def outbox_last_seq(self) -> int:
        """The highest seq in the outbox, or -1 when it is empty."""
        (seq,) = self._db.execute("SELECT max(seq) FROM outbox").fetchone()
        return -1 if seq is None else int(seq)

    def ack(self, seqs: Sequence[int]) -> int:
        """Delete acknowledged messages in one transaction; return how many were still there.

        Grouping acknowledgements costs nothing in safety: a row whose PUBACK
        arrived but whose delete was not yet committed is only sent once more.
        Raises SpoolFull when the disk refuses: nothing is deleted, and the
        caller keeps the seqs to try again. A seq the budget dropped was
        delivered after all: its readings come off the drop count.
        """
        if not seqs:
            return 0
        delivered = [seq for seq in seqs if seq in self._dropped_messages]
        # no cursor in a local: a traceback that outlives the call would keep its statement,
        # and with it the database file, open after `close`
        with self._write():
            deleted = self._db.executemany(
                "DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs]
            ).rowcount
            if delivered:
                undropped = sum(self._dropped_messages[seq] for seq in delivered)
                self._set_meta("dropped_readings", self._meta("dropped_readings", 0) - undropped)
        for seq in delivered:
            del self._dropped_messages[seq]
        self._pending_messages -= deleted
        return deleted

    # -- state ------------------------------------------------------------

    @property
    def pending_readings(self) -> int:
        """Committed readings not yet packed (held ones included)."""
        return self._pending_readings

    @property
    def pending_messages(self) -> int:
        """Packed messages not yet acknowledged."""
        return self._pending_messages

    @property
    def disk_full(self) -> bool:
        """True from a refused write until the next write that succeeds."""
        return self._disk_full

    def stats(self) -> SpoolStats:
        return SpoolStats(
            buffered=len(self._buffer),
            readings=self._pending_readings,
            messages=self._pending_messages,
            bytes_used=self._bytes_used(),
            dropped_readings=self._meta("dropped_readings", 0),
            next_seq=self._seq.peek(),
            memory_dropped=self.memory_dropped,
            unsynced=self._held,
            disk_full=self._disk_full,
        )

    def close(self) -> None:
        self._db.close()

    # -- private: writing -------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception).

        A seq taken since the last write is recorded in the same transaction.
        SQLite errors come out as SpoolError, a refusing filesystem as SpoolFull.
        """
        changes = self._db.total_changes
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                if self._seq_unrecorded:
                    self._set_meta("last_seq", self._seq.peek() - 1)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (disk full)
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            error = _translate(self._path, exc)
            self._disk_full = self._disk_full or isinstance(error, SpoolFull)
            raise error from exc
        self._seq_unrecorded = False
        if self._db.total_changes > changes:
            self._disk_full = False

    def _bound_wal(self, budget_bytes: int) -> None:
        """Keep the write-ahead log within a sixteenth of the budget.

        By default SQLite checkpoints the log at 1000 pages (4 MiB: four times the
        smallest budget) and keeps the file at its largest size for good, outside the
        budget. Checkpointed at a share of the budget, and cut back to that share when
        a long transaction made it grow past it, the spool's files stay within the
        budget and that share. (Not cut back to nothing: a log that gave its blocks
        back at every checkpoint would take them again at the next write, and on a
        full disk it would lose them to the first other writer, the alarm coming and
        going with every checkpoint.)
        """
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        pages = max(_WAL_MIN_PAGES, budget_bytes // _WAL_SHARE // int(page_size))
        self._db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        self._db.execute(f"PRAGMA journal_size_limit={pages * int(page_size)}")

    def _take(self) -> int:
        """The next seq; the filesystem's refusal to extend the seq file becomes SpoolFull."""
        try:
            seq = self._seq.take()
        except OSError as exc:
            # the counter raised its bound in memory before the write failed: start again
            # from what the file really holds, so no number it does not cover is handed out
            self._seq = SeqCounter(self._seq.path, floor=self._seq.peek())
            if exc.errno in _NO_ROOM:
                self._disk_full = True
                raise SpoolFull(f"{self._seq.path}: {exc.strerror}") from exc
            raise SpoolError(f"{self._seq.path}: {exc.strerror}") from exc
        self._seq_unrecorded = True
        return seq

    def _rows(self, group: Sequence[Reading]) -> tuple[list[tuple[int, float, float, int]], int]:
        """Rows to insert, and how many of them are held for their time."""
        rows = [(self._channel(r), r.value, r.time, r.time_quality) for r in group]
        held = sum(1 for r in group if r.time_quality == TIME_UNSYNCED)
        start = self._boot_wall_start
        if held and start is not None:  # late: the boot's start is known, correct them now
            rows = [
                (c, v, t + start, TIME_SYNCED) if q == TIME_UNSYNCED else (c, v, t, q)
                for c, v, t, q in rows
            ]
            held = 0
        return rows, held

    def _trim_buffer(self) -> None:
        """Drop the oldest buffered readings beyond `memory_max_readings`, counting them."""
        excess = len(self._buffer) - self._memory_max
        if excess <= 0:
            return
        if not self._trimming:  # once per episode: `add` may call this many times a second
            log.warning(
                "spool memory buffer full (%d readings): dropping the oldest", self._memory_max
            )
            self._trimming = True
        del self._buffer[:excess]
        self.memory_dropped += excess

    def _claim_boot(self) -> None:
        """In a transaction: every TIME_UNSYNCED reading stored so far is from an earlier boot.

        Done by the first write that stores a TIME_UNSYNCED reading of this boot or dates
        the held ones, never on open: opening must work on a full disk.
        """
        self._db.execute(
            "UPDATE readings SET tq = ? WHERE tq = ?", (_UNDATED_BEFORE, TIME_UNSYNCED)
        )
        self._set_meta("boot_id", self._boot_id)

    def _date_held(self) -> int:
        start = self._boot_wall_start
        if start is None:
            return 0
        with self._write():
            if not self._boot_claimed:
                self._claim_boot()
            fixed = self._db.execute(
                "UPDATE readings SET t = t + ?, tq = ? WHERE tq = ?",
                (start, TIME_SYNCED, TIME_UNSYNCED),
            ).rowcount
            dated = self._date_before(start)
        self._boot_claimed = True
        self._dating_due = False
        self._held -= fixed + dated
        return fixed + dated

    def _date_before(self, start: float) -> int:
        """In a transaction: date the readings of earlier boots back from `start`.

        The newest goes to `start`. Within a boot each keeps its boot-time
        distance from the newest of that boot; where boot time goes back between
        two readings (a boot began in between), the older boot's newest goes to
        the start of the newer boot. So every time is one its reading was taken
        before, and the readings keep their order and spacing (one time for all
        would merge a sensor's readings for any consumer keyed by name and time).
        """
        (newest,) = self._db.execute(
            "SELECT max(id) FROM readings WHERE tq = ?", (_UNDATED_BEFORE,)
        ).fetchone()
        if newest is None:
            return 0
        (newest_t,) = self._db.execute("SELECT t FROM readings WHERE id = ?", (newest,)).fetchone()
        # the first reading of each later boot, and the boot time of the reading before it
        boots = self._db.execute(
            "SELECT id, before FROM (SELECT id, t, lag(t) OVER (ORDER BY id) AS before "
            "FROM readings WHERE tq = ?) WHERE before > t ORDER BY id DESC",
            (_UNDATED_BEFORE,),
        ).fetchall()
        shift, last, dated = start - float(newest_t), int(newest), 0
        for first, before in [*boots, (0, 0.0)]:
            dated += self._db.execute(
                "UPDATE readings SET t = t + ?, tq = ? WHERE tq = ? AND id BETWEEN ? AND ?",
                (shift, TIME_BEFORE, _UNDATED_BEFORE, first, last),
            ).rowcount
            shift, last = shift - float(before), int(first) - 1
        return dated

    def _keep_budget(self) -> None:
        with _logged("keeping the byte budget"):
            self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Drop the oldest data until the file's live pages fit the budget."""
        while self._bytes_used() > self._budget:
            dropped = self._drop_oldest()
            if dropped == 0:
                return

    def _drop_oldest(self) -> int:
        messages = readings = held = 0
        with self._write():
            row = self._db.execute(
                "SELECT seq, readings FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
                messages, dropped = 1, int(row[1])
            else:
                ids = self._db.execute(
                    "SELECT id, tq FROM readings ORDER BY id LIMIT 1000"
                ).fetchall()
                if ids:
                    self._db.execute("DELETE FROM readings WHERE id <= ?", (ids[-1][0],))
                readings = dropped = len(ids)
                held = sum(1 for _, tq in ids if tq in (TIME_UNSYNCED, _UNDATED_BEFORE))
            if dropped:
                self._set_meta("dropped_readings", self._meta("dropped_readings", 0) + dropped)
        if row is not None:
            self._remember_dropped(int(row[0]), dropped)
        self._pending_messages -= messages
        self._pending_readings -= readings
        self._held -= held
        return dropped

    def _remember_dropped(self, seq: int, readings: int) -> None:
        """A message the budget dropped: its PUBACK may still come (see `ack`)."""
        self._dropped_messages[seq] = readings
        while len(self._dropped_messages) > _DROPPED_REMEMBERED:
            self._dropped_messages.popitem(last=False)

    # -- private: reading -------------------------------------------------

    def _bytes_used(self) -> int:
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        (size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * size)

    def _load_channels(self) -> None:
        for cid, sensor, quantity, unit in self._db.execute(
            "SELECT id, sensor, quantity, unit FROM channels"
        ):
            self._channels[(sensor, quantity, unit)] = cid
            self._channel_rows[cid] = (sensor, quantity, unit)

    def _channel(self, reading: Reading) -> int:
        key = (reading.sensor, reading.quantity, reading.unit)
        cid = self._channels.get(key)
        if cid is None:
            cur = self._db.execute(
                "INSERT INTO channels (sensor, quantity, unit) VALUES (?, ?, ?)", key
            )
            cid = int(cur.lastrowid or 0)
            self._channels[key] = cid
            self._channel_rows[cid] = key
        return cid

    def _forget_uncommitted_channels(self) -> None:
        """After a rolled-back transaction, channel ids created in it no longer exist."""
        self._channels.clear()
        self._channel_rows.clear()
        self._load_channels()

    def _reading(self, channel: int, value: float, t: float, tq: int) -> Reading:
        sensor, quantity, unit = self._channel_rows[channel]
        return Reading(sensor, quantity, value, unit, t, tq)

    def _count(self, table: str) -> int:
        (count,) = self._db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - fixed table names
        return int(count)

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _meta_text(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: int | str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Follow-up work after a successful write: a refusal is logged, never raised."""
    try:
        yield
    except SpoolError as exc:
        log.warning("spool: %s failed: %s (retried after the next write)", what, exc)


def _translate(path: Path, exc: sqlite3.Error) -> SpoolError:
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) or "full" in text or "I/O" in text:
        return SpoolFull(f"{path}: {text}")
    return SpoolError(f"{path}: {text}")


def _kernel_boot_id() -> str:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:  # not Linux: each process counts as a boot, so nothing is mis-dated
        return f"process-{uuid.uuid4()}"
