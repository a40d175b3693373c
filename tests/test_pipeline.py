"""The pipeline derives fill level from distance and the bin's geometry, never inventing it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import BinGeometry
from agent.pipeline import Pipeline, fill_level
from drivers.base import Reading

BIN = BinGeometry(empty_distance_m=1.20, full_distance_m=0.20)


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
    got: list[Reading] = []

    def sink(readings: Sequence[Reading]) -> None:
        got.extend(readings)

    pipeline = Pipeline({"bin_7": BIN}, sink)
    pipeline(
        [
            Reading("bin_7", "distance", 0.70, "m", 100.0),
            Reading("bin_7", "distance", 3.00, "m", 101.0),
            Reading("bin_7", "temperature", 12.0, "Cel", 101.0),
            Reading("air_1", "distance", 0.70, "m", 101.0),
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
    assert got[1].time == 100.0
    assert pipeline.counters["bin_7.fill_out_of_range"] == 1
