"""The pipeline derives fill level from distance and the bin's geometry, never inventing it,
and never passes on a time read from a clock that was not set yet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.clock import BUILD_FLOOR, WallClock
from agent.config import BinGeometry
from agent.pipeline import Pipeline, fill_level
from drivers.base import TIME_SYNCED, TIME_UNSYNCED, Reading

BIN = BinGeometry(empty_distance_m=1.20, full_distance_m=0.20)
REAL = 1_790_000_000.0  # a moment the clock is right at
BOOT_AT_EPOCH = 5.0  # a gateway without RTC: wall clock = boot time + 5 s at the epoch


@dataclass
class Clocks:
    """A wall clock someone can set, and a boot clock."""

    wall: float
    boot: float = 100.0

    def clock(self) -> WallClock:
        return WallClock(BUILD_FLOOR, wall=lambda: self.wall, boot=lambda: self.boot)


class Sink(list[Reading]):
    def __call__(self, readings: Sequence[Reading]) -> None:
        self.extend(readings)


@pytest.mark.parametrize(
    ("distance", "level"),
    [(1.20, 0.0), (0.20, 100.0), (0.70, 50.0), (1.25, 0.0), (0.15, 100.0), (0.95, 25.0)],
)
def test_fill_level_follows_the_geometry_and_clamps_small_overshoots(
    distance: float, level: float
) -> None:
    assert fill_level(distance, BIN) == level


@pytest.mark.parametrize("distance", [1.40, 0.05, float("nan"), float("inf")])
def test_implausible_distances_give_no_fill_level(distance: float) -> None:
    assert fill_level(distance, BIN) is None


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_fill_level_is_none_or_within_0_and_100(distance: float) -> None:
    level = fill_level(distance, BIN)
    assert level is None or 0.0 <= level <= 100.0


def test_pipeline_adds_fill_level_next_to_distance_and_counts_faults() -> None:
    got = Sink()
    pipeline = Pipeline({"bin_7": BIN}, got, clock=Clocks(REAL).clock())
    pipeline(
        [
            Reading("bin_7", "distance", 0.70, "m", REAL),
            Reading("bin_7", "distance", 3.00, "m", REAL + 1),
            Reading("bin_7", "temperature", 12.0, "Cel", REAL + 1),
            Reading("air_1", "distance", 0.70, "m", REAL + 1),
        ]
    )
    assert [(r.sensor, r.quantity, r.value) for r in got] == [
        ("bin_7", "distance", 0.70),
        ("bin_7", "fill_level", 50.0),
        ("bin_7", "distance", 3.00),
        ("bin_7", "temperature", 12.0),
        ("air_1", "distance", 0.70),
    ]
    assert got[1].unit == "%"
    assert (got[1].time, got[1].time_quality) == (REAL, TIME_SYNCED)
    assert pipeline.counters["bin_7.fill_out_of_range"] == 1


# --- stamping -----------------------------------------------------------------------------


def test_readings_stamped_by_a_trusted_clock_pass_unchanged() -> None:
    got = Sink()
    readings = [Reading("air_1", "pm2_5", 7.0, "ug/m3", REAL - 0.5)]
    Pipeline({}, got, clock=Clocks(REAL).clock())(readings)
    assert got == readings


def test_readings_stamped_before_the_clock_is_set_get_boot_time_and_unsynced() -> None:
    clocks = Clocks(wall=100.0 + BOOT_AT_EPOCH)  # 1970: no RTC, no NTP yet
    got = Sink()
    pipeline = Pipeline({"bin_7": BIN}, got, clock=clocks.clock())
    pipeline(
        [
            Reading("bin_7", "distance", 0.70, "m", 99.5 + BOOT_AT_EPOCH),
            Reading("air_1", "pm2_5", 7.0, "ug/m3", 100.0 + BOOT_AT_EPOCH),
        ]
    )
    assert [(r.quantity, r.time, r.time_quality) for r in got] == [
        ("distance", 99.5, TIME_UNSYNCED),
        ("fill_level", 99.5, TIME_UNSYNCED),  # derived readings keep the corrected stamp
        ("pm2_5", 100.0, TIME_UNSYNCED),
    ]


def test_a_reading_stamped_just_before_ntp_set_the_clock_is_corrected_in_place() -> None:
    clocks = Clocks(wall=100.0 + BOOT_AT_EPOCH)
    clock = clocks.clock()
    got = Sink()
    pipeline = Pipeline({}, got, clock=clock)
    assert clock.check() is None  # the service looks at the clock every second
    stamped = Reading("air_1", "pm2_5", 7.0, "ug/m3", clocks.wall)
    clocks.wall = REAL  # NTP steps the clock between the driver's stamp and the pipeline
    pipeline([stamped])
    assert [(r.time, r.time_quality) for r in got] == [(REAL, TIME_SYNCED)]


def test_a_reading_below_the_floor_from_a_clock_never_seen_there_is_dropped_and_counted() -> None:
    got = Sink()
    pipeline = Pipeline({}, got, clock=Clocks(REAL).clock())
    good = Reading("air_1", "pm10", 9.0, "ug/m3", REAL)
    pipeline([Reading("air_1", "pm2_5", 7.0, "ug/m3", 1000.0), good])
    assert got == [good]
    assert pipeline.time_unknown == 1


@given(
    walls=st.lists(st.floats(min_value=0, max_value=3e9), min_size=1, max_size=6),
    lag=st.floats(min_value=0, max_value=5),
)
def test_no_time_below_the_floor_ever_leaves_the_pipeline_as_synced(
    walls: list[float], lag: float
) -> None:
    """Whatever the clock is set to between stamps, a synced time is at or above the floor."""
    clocks = Clocks(wall=walls[0])
    got = Sink()
    pipeline = Pipeline({"bin_7": BIN}, got, clock=clocks.clock())
    for wall in walls:
        clocks.wall = wall
        stamp = clocks.wall - lag
        clocks.boot += 1.0
        pipeline([Reading("bin_7", "distance", 0.70, "m", stamp)])
    for reading in got:
        assert reading.time_quality == TIME_UNSYNCED or reading.time >= BUILD_FLOOR
