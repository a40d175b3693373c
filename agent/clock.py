"""The wall clock, and when to believe it.

A gateway without a battery-backed clock boots at 1970 and is set later by
NTP; any clock can be stepped forward or back while the agent runs. Nothing
the agent schedules uses the wall clock (periods and timeouts use the event
loop's monotonic time), but readings carry wall time, so the pipeline asks a
`WallClock` whether a reading's time can be believed.

The rule: the wall clock is trusted when it reads at least `floor`, the later
of `BUILD_FLOOR` (no gateway runs this code before it was written) and the
start of the gateway certificate's validity (the CA issued it, so that moment
has passed). A time below the floor was stamped by a wrong clock; the pipeline
turns it into CLOCK_BOOTTIME seconds (time since boot, suspend included, which
nobody sets) marked TIME_UNSYNCED, and the spool turns those into wall time
with `boot_wall_start` once the clock is trusted.

`check`, called about once a second, reports what changed since the previous
call: the clock became trusted or untrusted, or it jumped (the offset between
wall clock and boot time moved by more than a threshold).

Other things the agent dates (events, for one) take a `Moment`: the
wall time if the clock is trusted, else the boot time, which `date` turns
into wall time once the clock is trusted, as the spool does for readings.

Trust: the wall clock only at or above the floor; CLOCK_BOOTTIME always (the
kernel counts it and it cannot be set).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

#: 2026-01-01T00:00:00Z: a wall clock reading earlier than this is wrong
BUILD_FLOOR: Final = 1767225600.0
#: a change of the wall-minus-boot offset larger than this between two checks is a jump
JUMP_THRESHOLD_S: Final = 2.0

TRUSTED: Final = "trusted"
UNTRUSTED: Final = "untrusted"
JUMPED: Final = "jumped"


def boottime() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME); never set by anyone."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def trust_floor(not_before: datetime | None = None) -> float:
    """The earliest wall time believed: `BUILD_FLOOR`, or the certificate's start if later."""
    if not_before is None:
        return BUILD_FLOOR
    return max(BUILD_FLOOR, not_before.timestamp())


@dataclass(frozen=True, slots=True)
class ClockChange:
    """What `WallClock.check` saw change.

    `kind` is TRUSTED, UNTRUSTED or JUMPED; `boot_wall_start` is the wall time
    of this boot as the clock now tells it (what boot times are corrected
    with); `step_s` is how far the wall clock moved against boot time since
    the previous check (positive: forward).
    """

    kind: str
    boot_wall_start: float
    step_s: float


@dataclass(frozen=True, slots=True)
class Moment:
    """When something happened, as well as the clocks could tell then: wall time when
    `synced`, else CLOCK_BOOTTIME seconds of this boot (`WallClock.date` dates it later)."""

    t: float
    synced: bool


class WallClock:
    """The wall clock with the trust rule; the clock functions are injectable for tests."""

    def __init__(
        self,
        floor: float = BUILD_FLOOR,
        *,
        wall: Callable[[], float] = time.time,
        boot: Callable[[], float] = boottime,
        jump_threshold_s: float = JUMP_THRESHOLD_S,
    ) -> None:
        self.floor = floor
        self._wall = wall
        self._boot = boot
        self._jump_threshold_s = jump_threshold_s
        self._untrusted_offset: float | None = None
        wall_now, boot_now = self._sample()
        self._offset = wall_now - boot_now
        self._was_trusted = wall_now >= floor

    def _sample(self) -> tuple[float, float]:
        """(wall, boot) now; remembers the offset whenever the wall clock is below the floor."""
        wall_now, boot_now = self._wall(), self._boot()
        if wall_now < self.floor:
            self._untrusted_offset = wall_now - boot_now
        return wall_now, boot_now

    def trusted(self) -> bool:
        """True when the wall clock reads at least the floor now."""
        return self._sample()[0] >= self.floor

    def boot_wall_start(self) -> float:
        """The wall time of this boot as the clock now tells it: wall now minus boot time now."""
        wall_now, boot_now = self._sample()
        return wall_now - boot_now

    def moment(self) -> Moment:
        """Now: the wall time if it can be believed, else the boot time."""
        wall_now, boot_now = self._sample()
        return Moment(wall_now, True) if wall_now >= self.floor else Moment(boot_now, False)

    def date(self, moment: Moment) -> float | None:
        """The wall time of `moment` (of this boot), or None while it cannot be told yet:
        the moment was taken by boot time and the clock is still not trusted."""
        if moment.synced:
            return moment.t
        wall_now, boot_now = self._sample()
        return moment.t + wall_now - boot_now if wall_now >= self.floor else None

    def untrusted_offset(self) -> float | None:
        """Wall minus boot time as last seen below the floor (now, if it is below it now).

        A time stamped by the untrusted clock minus this offset is its boot
        time. None when the clock has never been seen below the floor.
        """
        self._sample()
        return self._untrusted_offset

    def check(self) -> ClockChange | None:
        """What changed since the previous check (or since this clock was made), if anything.

        Becoming trusted or untrusted is reported as such (it is usually a
        jump too, whose size is in `step_s`); otherwise a change of the offset
        larger than the threshold is a jump. A slewing clock never is one.
        """
        wall_now, boot_now = self._sample()
        offset = wall_now - boot_now
        step = offset - self._offset
        self._offset = offset
        trusted = wall_now >= self.floor
        if trusted != self._was_trusted:
            self._was_trusted = trusted
            return ClockChange(TRUSTED if trusted else UNTRUSTED, offset, step)
        if abs(step) > self._jump_threshold_s:
            return ClockChange(JUMPED, offset, step)
        return None
