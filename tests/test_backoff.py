"""Backoff delays grow exponentially, are jittered, and never drop below the floor."""

from __future__ import annotations

import random

from agent.backoff import FLOOR_S, Backoff


def test_delays_stay_between_floor_and_exponential_ceiling() -> None:
    backoff = Backoff(initial_s=0.5, max_s=60.0)
    rand = random.Random(7)
    for attempt in range(200):
        ceiling = min(60.0, 0.5 * 2**attempt)
        delay = backoff.delay(attempt, rand)
        assert FLOOR_S <= delay <= max(FLOOR_S, ceiling)


def test_delays_are_jittered_not_fixed() -> None:
    backoff = Backoff(initial_s=1.0, max_s=60.0)
    rand = random.Random(1)
    draws = {round(backoff.delay(10, rand), 6) for _ in range(50)}
    assert len(draws) > 40


def test_ceiling_is_capped_for_huge_attempt_numbers() -> None:
    assert Backoff(initial_s=0.5, max_s=30.0).ceiling(10_000) == 30.0
