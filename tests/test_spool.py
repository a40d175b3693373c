"""The spool keeps readings until their message is acknowledged, and seq never repeats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from agent.seq import SeqCounter, SeqError
from agent.spool import Spool
from drivers.base import TIME_BEFORE, TIME_SYNCED, TIME_UNSYNCED, Reading


def _readings(n: int, start: int = 0, sensor: str = "air_1") -> list[Reading]:
    return [
        Reading(sensor, "pm2_5", float(start + i), "ug/m3", 1_700_000_000.0 + i) for i in range(n)
    ]


def _build(readings: Sequence[Reading], seq: int) -> tuple[str, bytes]:
    body = ",".join(str(r.value) for r in readings)
    return "citygate/gw/telemetry", f"{seq}:{body}".encode()


def _spool(tmp_path: Path, budget: int = 64 << 20) -> Spool:
    return Spool(tmp_path / "spool.sqlite", tmp_path / "seq", budget_bytes=budget)


def test_readings_survive_reopen_only_after_commit(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.add(_readings(5))
    assert spool.commit() == 5
    spool.add(_readings(3, start=5))  # buffered, never committed: the documented loss window
    spool.close()
    spool = _spool(tmp_path)
    assert spool.stats().readings == 5
    spool.close()


def test_pack_moves_readings_into_one_outbox_row_in_order(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.add(_readings(7))
    spool.commit()
    row = spool.pack(5, _build)
    assert row is not None
    assert row.readings == 5
    assert row.payload == b"0:0.0,1.0,2.0,3.0,4.0"
    stats = spool.stats()
    assert (stats.readings, stats.messages) == (2, 1)
    spool.close()


def test_outbox_row_is_resent_byte_identical_until_acked(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.add(_readings(3))
    spool.commit()
    packed = spool.pack(10, _build)
    assert packed is not None
    spool.close()
    spool = _spool(tmp_path)
    (again,) = spool.outbox()
    assert again == packed
    assert spool.ack([again.seq]) == 1
    assert spool.outbox() == []
    assert spool.ack([again.seq]) == 0
    spool.close()


def test_seq_strictly_increases_across_restarts(tmp_path: Path) -> None:
    seen: list[int] = []
    for _ in range(3):
        spool = _spool(tmp_path)
        for _ in range(4):
            spool.add(_readings(1))
            spool.commit()
            row = spool.pack(10, _build)
            assert row is not None
            seen.append(row.seq)
        spool.close()
    assert seen == sorted(set(seen))


def test_seq_never_repeats_when_the_spool_file_is_deleted(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.add(_readings(2))
    spool.commit()
    first = spool.pack(1, _build)
    second = spool.pack(1, _build)
    assert first is not None
    assert second is not None
    spool.close()
    for name in ("spool.sqlite", "spool.sqlite-wal", "spool.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    spool = _spool(tmp_path)
    spool.add(_readings(1))
    spool.commit()
    third = spool.pack(1, _build)
    assert third is not None
    assert third.seq > second.seq
    spool.close()


def test_seq_counter_reserves_ahead_so_a_crash_cannot_reissue(tmp_path: Path) -> None:
    counter = SeqCounter(tmp_path / "seq", block=10)
    issued = [counter.take() for _ in range(15)]
    # a "crash": a new counter reads only the file, never the in-memory position
    restarted = SeqCounter(tmp_path / "seq", block=10)
    assert restarted.take() > issued[-1]


def test_corrupt_seq_file_is_refused_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "seq").write_text("12x\n")
    with pytest.raises(SeqError, match="corrupt"):
        SeqCounter(tmp_path / "seq")


def test_budget_drops_oldest_and_counts_every_dropped_reading(tmp_path: Path) -> None:
    spool = _spool(tmp_path, budget=60_000)
    total = 0
    for batch in range(60):
        spool.add(_readings(200, start=batch * 200))
        spool.commit()
        total += 200
        spool.pack(200, _build)
    stats = spool.stats()
    kept = sum(row.readings for row in spool.outbox(limit=10_000)) + stats.readings
    assert stats.dropped_readings > 0
    assert kept + stats.dropped_readings == total
    assert stats.bytes_used <= 60_000
    # the survivors are the newest ones
    newest = spool.outbox(limit=10_000)[-1]
    assert newest.payload.endswith(b",11999.0")
    spool.close()


def test_pending_counts_match_the_database_after_reopen(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.add(_readings(25))
    spool.commit()
    spool.pack(10, _build)
    spool.pack(10, _build)
    first = spool.outbox()[0]
    spool.ack([first.seq])
    live = (spool.pending_readings, spool.pending_messages)
    spool.close()
    spool = _spool(tmp_path)
    assert live == (5, 1) == (spool.pending_readings, spool.pending_messages)
    spool.close()


# -- the memory buffer ---------------------------------------------------------------


def test_memory_buffer_keeps_the_newest_readings_and_counts_the_dropped(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool.sqlite", tmp_path / "seq", budget_bytes=64 << 20, memory_max_readings=100
    )
    spool.add(_readings(250))
    assert (spool.stats().buffered, spool.memory_dropped) == (100, 150)
    assert spool.commit() == 100
    row = spool.pack(1000, _build)
    assert row is not None
    assert row.payload.startswith(b"0:150.0,151.0,")
    assert spool.stats().memory_dropped == 150
    spool.close()


# -- one seq counter for every signed message ----------------------------------------


def test_take_seq_shares_the_counter_with_pack(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seen: list[int] = []
    for n in range(3):
        seen.append(spool.take_seq())
        spool.add(_readings(1, start=n))
        spool.commit()
        row = spool.pack(10, _build)
        assert row is not None
        seen.append(row.seq)
    assert seen == sorted(set(seen))
    spool.close()


def test_a_seq_taken_for_health_is_never_repeated_when_the_seq_file_is_lost(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path)
    taken = [spool.take_seq() for _ in range(3)]
    spool.close()
    (tmp_path / "seq").unlink()
    spool = _spool(tmp_path)
    assert spool.take_seq() > taken[-1]
    spool.add(_readings(1))
    spool.commit()
    row = spool.pack(10, _build)
    assert row is not None
    assert row.seq > taken[-1]
    spool.close()


# -- readings whose time is not yet trustworthy --------------------------------------


def _unsynced(n: int, start: int = 0, sensor: str = "air_1") -> list[Reading]:
    """Stamped with CLOCK_BOOTTIME seconds, as before the clock is trusted."""
    return [
        Reading(sensor, "pm2_5", float(start + i), "ug/m3", 100.0 + i, TIME_UNSYNCED)
        for i in range(n)
    ]


def _open(tmp_path: Path, boot_id: str, budget: int = 64 << 20) -> Spool:
    return Spool(tmp_path / "spool.sqlite", tmp_path / "seq", budget_bytes=budget, boot_id=boot_id)


def _packed(spool: Spool) -> list[Reading]:
    """Pack everything packable with a builder that keeps the readings it was given."""
    got: list[Reading] = []

    def keep(readings: Sequence[Reading], seq: int) -> tuple[str, bytes]:
        got.extend(readings)
        return "citygate/gw/telemetry", str(seq).encode()

    spool.pack_ready(1000, keep, partial=True)
    return got


def test_unsynced_readings_are_held_and_pack_takes_the_oldest_of_the_rest(
    tmp_path: Path,
) -> None:
    spool = _open(tmp_path, "boot-a")
    spool.add(_unsynced(3))
    spool.add(_readings(2, start=10))
    spool.add(_unsynced(2, start=20))
    spool.add(_readings(2, start=30))
    spool.commit()
    assert (spool.pending_readings, spool.pending_unsynced) == (9, 5)
    assert [r.value for r in _packed(spool)] == [10.0, 11.0, 30.0, 31.0]
    assert (spool.pending_readings, spool.pending_unsynced) == (5, 5)
    assert spool.pack(10, _build) is None  # held ones are never packed
    spool.close()


def test_correct_times_turns_boot_time_into_wall_time_for_held_and_later_readings(
    tmp_path: Path,
) -> None:
    spool = _open(tmp_path, "boot-a")
    spool.add(_unsynced(3))
    spool.commit()
    spool.close()
    spool = _open(tmp_path, "boot-a")  # a restart within the same boot: still correctable
    assert spool.correct_times(1_760_000_000.0) == 3
    assert spool.pending_unsynced == 0
    spool.add(_unsynced(1, start=3))  # stamped before the clock was trusted, handed over after
    spool.commit()
    got = _packed(spool)
    assert [(r.time, r.time_quality) for r in got] == [
        (1_760_000_100.0, TIME_SYNCED),
        (1_760_000_101.0, TIME_SYNCED),
        (1_760_000_102.0, TIME_SYNCED),
        (1_760_000_100.0, TIME_SYNCED),
    ]
    spool.close()


def test_held_readings_of_an_earlier_boot_go_out_flagged_as_before_this_boot(
    tmp_path: Path,
) -> None:
    spool = _open(tmp_path, "boot-a")
    spool.add(_unsynced(2, sensor="bin_1"))
    spool.commit()
    spool.close()
    spool = _open(tmp_path, "boot-b")
    spool.add(_unsynced(1, sensor="air_1"))
    spool.commit()
    assert spool.pending_unsynced == 3
    assert _packed(spool) == []  # nothing goes out before the clock is trusted
    assert spool.correct_times(1_800_000_000.0) == 3
    got = [(r.sensor, r.time, r.time_quality) for r in _packed(spool)]
    assert got == [  # the newest of boot a at the start of boot b, the other a second earlier
        ("bin_1", 1_799_999_999.0, TIME_BEFORE),
        ("bin_1", 1_800_000_000.0, TIME_BEFORE),
        ("air_1", 1_800_000_100.0, TIME_SYNCED),
    ]
    spool.close()


def test_readings_of_an_earlier_boot_stay_marked_across_restarts(tmp_path: Path) -> None:
    spool = _open(tmp_path, "boot-a")
    spool.add(_unsynced(2))
    spool.commit()
    spool.close()
    _open(tmp_path, "boot-b").close()  # boot b marks them, and stops before the clock is trusted
    spool = _open(tmp_path, "boot-b")
    assert spool.correct_times(1_800_000_000.0) == 2
    assert [(r.time, r.time_quality) for r in _packed(spool)] == [
        (1_799_999_999.0, TIME_BEFORE),
        (1_800_000_000.0, TIME_BEFORE),
    ]
    spool.close()


def test_readings_of_two_earlier_boots_keep_their_order_and_a_time_they_were_taken_before(
    tmp_path: Path,
) -> None:
    spool = _open(tmp_path, "boot-a")
    spool.add(_unsynced(3, sensor="bin_1"))  # boot times 100-102
    spool.commit()
    spool.close()
    spool = _open(tmp_path, "boot-b")
    spool.add([replace(r, time=r.time - 95.0) for r in _unsynced(2, start=3, sensor="bin_1")])
    spool.commit()  # boot times 5-6: boot b began after boot a's last reading
    spool.close()
    spool = _open(tmp_path, "boot-c")
    assert spool.correct_times(1_800_000_000.0) == 5
    got = [(r.value, r.time, r.time_quality) for r in _packed(spool)]
    assert got == [
        (0.0, 1_799_999_992.0, TIME_BEFORE),  # boot a, spaced as taken, its newest at the
        (1.0, 1_799_999_993.0, TIME_BEFORE),  # start of boot b (5 s of boot time before
        (2.0, 1_799_999_994.0, TIME_BEFORE),  # boot b's first reading)
        (3.0, 1_799_999_999.0, TIME_BEFORE),  # boot b: its newest at the start of boot c
        (4.0, 1_800_000_000.0, TIME_BEFORE),
    ]
    spool.close()


def test_held_readings_count_in_the_budget_and_their_count_survives_drops(tmp_path: Path) -> None:
    spool = _open(tmp_path, "boot-a", budget=60_000)
    for batch in range(30):
        spool.add(_unsynced(200, start=batch * 200))
        spool.commit()
    stats = spool.stats()
    assert stats.dropped_readings > 0
    assert stats.bytes_used <= 60_000
    assert spool.pending_unsynced == spool.pending_readings == 6000 - stats.dropped_readings
    spool.close()
    spool = _open(tmp_path, "boot-a", budget=60_000)
    assert spool.pending_unsynced == spool.pending_readings
    spool.close()


def test_a_dropped_message_that_is_acknowledged_after_all_comes_off_the_drop_count(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path, budget=60_000)
    for i in range(2000):  # one message per reading, seq 0, 1, 2, ...
        spool.add(_readings(1, start=i))
        spool.commit()
        spool.pack(1, _build)
    dropped = spool.stats().dropped_readings
    assert dropped > 0
    # the budget dropped the oldest messages while they were in flight: PUBACKs come
    assert spool.ack(list(range(dropped))) == 0
    assert spool.stats().dropped_readings == 0
    spool.close()


def test_the_write_ahead_log_stays_within_a_sixteenth_of_the_budget(tmp_path: Path) -> None:
    spool = _spool(tmp_path, budget=1 << 20)
    wal = tmp_path / "spool.sqlite-wal"
    largest = 0
    for start in range(0, 20_000, 100):
        spool.add(_readings(100, start=start))
        spool.commit()
        spool.pack_ready(10, _build, partial=True)
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    spool.close()
    assert largest <= (1 << 20) // 16 + 8 * 4096  # and a transaction's pages
