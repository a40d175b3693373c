"""What the broker got from the agent, judged: completeness after a clean stop, and order.

Shared by the scenarios that break the agent's link (`test_outage`,
`test_network`). Everything here reads the `Observer`'s verified messages and
the agent's own last-run.json; nothing reads the agent's insides.

- `stop_and_account(rig)`: stop the agent cleanly and prove that every reading
  it accepted in this run reached the broker exactly once, and that nothing is
  left spooled or was dropped.
- `time_order_violations(messages)`: per sensor, readings sorted by message
  seq (and by position inside a message) must have non-decreasing times.
- `first_copies(observer)`: telemetry in order of first arrival, each
  (gateway, seq) once, with its `Arrival`.
- `session_reports(observer)`: the health reports that open a new session
  (their `connects` count went up), to learn from outside when the agent
  reconnected.

Trust: the observer verified every message it keeps; last-run.json is the
agent's word about itself, checked against what arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.envelope import VerifiedMessage
from hil_tests.observe import Arrival, Observer, SignedPack, wait_until
from hil_tests.rig import Rig

#: how long the observer may take, after a clean stop, to receive the last messages
_SETTLE_S = 15.0


@dataclass(frozen=True)
class FirstCopy:
    """The first arrival of one telemetry message."""

    arrival: Arrival
    message: VerifiedMessage


def wall_time(arrival: Arrival) -> float:
    """The Unix time of an arrival (`Arrival.at` is monotonic), to compare with reading times."""
    return arrival.at + (time.time() - time.monotonic())


def first_copies(observer: Observer) -> list[FirstCopy]:
    """Verified telemetry in order of first arrival, each (gateway, seq) once."""
    seen: set[tuple[str, int]] = set()
    found: list[FirstCopy] = []
    for arrival in list(observer.arrivals):
        message = arrival.message
        if arrival.kind != "telemetry" or message is None:
            continue
        key = (message.gateway_id, message.seq)
        if key not in seen:
            seen.add(key)
            found.append(FirstCopy(arrival, message))
    return found


def time_order_violations(messages: Iterable[VerifiedMessage]) -> list[str]:
    """Per sensor, a reading whose time is before the previous one in seq order."""
    last: dict[str, tuple[int, float]] = {}
    found: list[str] = []
    for message in sorted(messages, key=lambda m: m.seq):
        for record in message.records:
            before = last.get(record.sensor)
            if before is not None and record.t < before[1]:
                found.append(
                    f"{record.sensor}: seq {message.seq} has t={record.t:.3f} "
                    f"before t={before[1]:.3f} of seq {before[0]}"
                )
            last[record.sensor] = (message.seq, record.t)
    return found


def connects(pack: SignedPack) -> int | None:
    """The `connects` count of a health report (the agent's successful sessions so far)."""
    value = pack.value("agent", "connects")
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def session_reports(observer: Observer, *, after: int = -1) -> list[SignedPack]:
    """Health reports that were the first to show a new `connects` count, arrival index >
    `after`: each marks a session the agent opened (seen no earlier than it opened)."""
    best = -1
    found: list[SignedPack] = []
    for pack in observer.health():
        count = connects(pack)
        if count is None or count <= best:
            continue
        best = count
        if pack.arrival.index > after:
            found.append(pack)
    return found


def latest_connects(observer: Observer) -> int:
    """The highest `connects` count reported so far (0 before the first report)."""
    counts = [c for c in (connects(p) for p in observer.health()) if c is not None]
    return max(counts, default=0)


async def stop_and_account(rig: Rig) -> Mapping[str, object]:
    """Stop the agent cleanly; assert that every accepted reading arrived exactly once,
    in time order per sensor, and that nothing stayed spooled or was dropped.
    Returns the agent's last-run.json."""
    run = await rig.stop_agent()
    assert run.returncode == 0, rig.agent_log()[-4000:]
    summary = run.summary
    assert summary is not None, "a clean stop writes last-run.json"
    accepted = summary["accepted"]
    assert isinstance(accepted, int)
    observer = rig.observer
    await wait_until(
        lambda: observer.readings_total() >= accepted,
        timeout_s=_SETTLE_S,
        what=f"all {accepted} accepted readings at the observer "
        f"(so far {observer.readings_total()})",
    )
    assert observer.failures == []
    assert observer.readings_total() == accepted, "readings arrived that the agent did not count"
    assert not observer.repeated_readings(), "readings sent again under a new seq"
    assert observer.differing_duplicates() == [], "a message re-signed instead of re-sent"
    left = {k: summary[k] for k in ("spooled_readings", "spooled_messages", "dropped_readings")}
    assert left == dict.fromkeys(left, 0), left
    assert time_order_violations(observer.telemetry().values()) == []
    return summary
