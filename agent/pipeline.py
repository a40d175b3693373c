"""The pipeline between drivers and the spool: stamp, validate, derive, then hand on.

Stamping (agent.clock): drivers stamp readings with the wall clock. A time
below the clock's trust floor was read from a clock that was not set yet (a
gateway without RTC boots at 1970): such a reading is restamped with the
CLOCK_BOOTTIME seconds of the same moment and marked TIME_UNSYNCED, for the
spool to correct once the clock is trusted. Should the clock have been set
between the driver's stamp and the pipeline, the time is corrected here (the
clock remembers the offset it had while untrusted). Nothing below the floor
ever leaves the pipeline as TIME_SYNCED.

Drivers already drop what their device marks invalid (sentinels, warm-up, no
echo) and count it. Here the agent applies what only the gateway's config
knows: a bin's geometry turns an ultrasonic `distance` into `fill_level` (%).

Fill level = (empty - distance) / (empty - full) * 100. A distance a little
outside the bin (within `SLACK` of its depth: a wave of rubbish above the rim,
the bottom seen slightly long) is clamped to 0-100. A distance far outside is
a fault (a bird, a lid left open, a sensor knocked off axis): the distance is
still published as measured, but no fill level is invented from it, and the
case is counted. Pure apart from reading the clocks: a function of readings,
configuration and the time now; no I/O.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from agent.clock import WallClock
from agent.config import BinGeometry
from drivers.base import TIME_UNSYNCED, Reading

log = logging.getLogger(__name__)

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
    """Callable handed to drivers as their `emit`; forwards to `sink` (the spool).

    `clock` decides which times are believed (default: the build floor only;
    the service passes one whose floor includes the certificate's start).
    `counters` counts fill-level faults per sensor; `time_unknown` counts
    readings dropped because their time could not be placed at all (stamped
    below the floor, yet the clock was never seen below it: a driver bug).
    """

    def __init__(
        self,
        bins: Mapping[str, BinGeometry],
        sink: Callable[[Sequence[Reading]], None],
        *,
        clock: WallClock | None = None,
    ) -> None:
        self._bins = dict(bins)
        self._sink = sink
        self._clock = clock if clock is not None else WallClock()
        self.counters: Counter[str] = Counter()
        self.time_unknown = 0

    def __call__(self, readings: Sequence[Reading]) -> None:
        readings = self._stamp(readings)
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

    def _stamp(self, readings: Sequence[Reading]) -> Sequence[Reading]:
        """The readings with every time below the floor moved to boot time (or corrected)."""
        floor = self._clock.floor
        if all(reading.time >= floor for reading in readings):
            return readings  # stamped by a trusted clock: the usual case, nothing to do
        offset = self._clock.untrusted_offset()
        if offset is None:
            early = sum(reading.time < floor for reading in readings)
            self.time_unknown += early
            log.error("dropped %d reading(s) stamped before the clock's trust floor", early)
            return [reading for reading in readings if reading.time >= floor]
        correction = self._clock.boot_wall_start() if self._clock.trusted() else None
        out: list[Reading] = []
        for reading in readings:
            if reading.time >= floor:
                out.append(reading)
                continue
            boot_time = reading.time - offset
            if correction is None:
                out.append(replace(reading, time=boot_time, time_quality=TIME_UNSYNCED))
            else:  # the clock was set after the driver stamped this reading
                out.append(replace(reading, time=boot_time + correction))
        return out
