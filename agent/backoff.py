"""Reconnect and retry delays: exponential growth with full jitter.

Pure: a function of the attempt number and a random source. Callers sleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: never retry faster than this, whatever the jitter draws: no tight loops
FLOOR_S = 0.1


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays for attempt 0, 1, 2, ...: uniform in [floor, min(cap, initial * 2**attempt)]."""

    initial_s: float
    max_s: float

    def ceiling(self, attempt: int) -> float:
        # cap the exponent so 2**attempt never overflows a float
        return min(self.max_s, self.initial_s * 2.0 ** min(attempt, 62))

    def delay(self, attempt: int, rand: random.Random) -> float:
        ceiling = self.ceiling(attempt)
        return max(FLOOR_S, rand.uniform(0.0, ceiling))
