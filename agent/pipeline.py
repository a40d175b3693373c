"""The pipeline between drivers and the spool: validate, derive, then hand on.

Drivers already drop what their device marks invalid (sentinels, warm-up, no
echo) and count it. Here the agent applies what only the gateway's config
knows: a bin's geometry turns an ultrasonic `distance` into `fill_level` (%).

Fill level = (empty - distance) / (empty - full) * 100. A distance a little
outside the bin (within `SLACK` of its depth: a wave of rubbish above the rim,
the bottom seen slightly long) is clamped to 0-100. A distance far outside is
a fault (a bird, a lid left open, a sensor knocked off axis): the distance is
still published as measured, but no fill level is invented from it, and the
case is counted. Pure: a function of readings and configuration; no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from agent.config import BinGeometry
from drivers.base import Reading

#: how far outside the bin's depth (as a fraction of it) a distance is still clamped
SLACK = 0.1


def fill_level(distance_m: float, geometry: BinGeometry) -> float | None:
    """The fill level in % for a distance, or None when the distance is not plausible."""
    depth = geometry.empty_distance_m - geometry.full_distance_m
    if not math.isfinite(distance_m) or depth <= 0:
        return None
    level = (geometry.empty_distance_m - distance_m) / depth * 100.0
    if level < -SLACK * 100.0 or level > (1.0 + SLACK) * 100.0:
        return None
    return round(min(100.0, max(0.0, level)), 2)


class Pipeline:
    """Callable handed to drivers as their `emit`; forwards to `sink` (the spool)."""

    def __init__(
        self, bins: Mapping[str, BinGeometry], sink: Callable[[Sequence[Reading]], None]
    ) -> None:
        self._bins = dict(bins)
        self._sink = sink
        self.counters: Counter[str] = Counter()

    def __call__(self, readings: Sequence[Reading]) -> None:
        if not self._bins:
            self._sink(readings)
            return
        out: list[Reading] = []
        for reading in readings:
            out.append(reading)
            geometry = self._bins.get(reading.sensor)
            if geometry is None or reading.quantity != "distance":
                continue
            level = fill_level(reading.value, geometry)
            if level is None:
                self.counters[f"{reading.sensor}.fill_out_of_range"] += 1
                continue
            out.append(
                Reading(
                    reading.sensor,
                    "fill_level",
                    level,
                    "%",
                    reading.time,
                    reading.time_quality,
                )
            )
        self._sink(out)
