"""Broker outages (guarantee 1): nothing lost, order kept, fresh readings first, bounded drain.

The broker goes away while the agent keeps reading: stopped and started again
as it was, or restarted with a new server certificate from the same CA (the
agent trusts the CA, not one certificate). Batches are small and the backlog
rate low, so the outage leaves a backlog of many messages; the broker stays
away at least `outage_s`, and longer if the rig's sensors are slow to fill the
outbox with enough messages to judge a drain by. The backlog is what the
agent's outbox held (its spool file, read-only) just before the broker came
back: those rows were there before any new session, whatever the agent does
next. From what the observer received after the reconnection the scenario
proves:

- fresh first: a message whose readings were all taken after the agent's new
  session opened arrives before the last message of the backlog (arrival
  order, not wall time). The session's opening is learned from outside: the
  first health report with a higher `connects` count, which arrives no earlier
  than the session opened;
- the backlog arrives in ascending seq order;
- bounded rate: the backlog's arrivals are counted against the configured
  `backlog_messages_per_s` over the time they took, allowing the burst and the
  observer's own reconnection lag; the measured drain rate is printed;
- after a clean stop, every reading the agent accepted arrived exactly once,
  per sensor in time order, and nothing stayed spooled or was dropped.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.uplink import BACKLOG_BURST_S
from hil_tests.delivery import (
    FirstCopy,
    connects,
    first_copies,
    latest_connects,
    session_reports,
    stop_and_account,
    wall_time,
)
from hil_tests.observe import SignedPack, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec
from tests.agentrig import read_spool

pytestmark = pytest.mark.integration

#: the observer retries its own connection every second: messages the agent sent before it
#: was back arrive together, so the drain may look this much shorter than it was
OBSERVER_LAG_S = 2.0
#: the drain-rate check allows this factor over the configured rate (it is a bound on the
#: agent's behaviour, counted by arrivals, not a stopwatch)
RATE_MARGIN = 1.25
#: how long the broker may stay away, at most, for the agent to spool a backlog worth judging
BACKLOG_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Outage:
    """How long the broker is away, and the batching that turns it into a backlog."""

    outage_s: float
    batch_max_readings: int
    backlog_per_s: float
    drain_timeout_s: float

    def tuning(self) -> dict[str, dict[str, object]]:
        return {
            "spool": {"batch_max_readings": self.batch_max_readings},
            "broker": {"backlog_messages_per_s": self.backlog_per_s},
        }

    @property
    def burst(self) -> int:
        """The sender's token-bucket burst for this rate (agent.uplink.OutboxSender)."""
        return max(1, math.ceil(self.backlog_per_s * BACKLOG_BURST_S))

    @property
    def min_backlog(self) -> int:
        """The fewest backlog messages that tell a bounded drain from an unbounded one (which
        shows as all of them at once, inside the allowance for the observer's lag)."""
        return math.floor(self.burst + RATE_MARGIN * self.backlog_per_s * OBSERVER_LAG_S) + 2


SHORT = Outage(outage_s=5.0, batch_max_readings=10, backlog_per_s=5.0, drain_timeout_s=60.0)
LONG = Outage(outage_s=180.0, batch_max_readings=20, backlog_per_s=10.0, drain_timeout_s=900.0)


@pytest.mark.parametrize("new_cert", [False, True], ids=["stop-start", "new-cert"])
@pytest.mark.parametrize(
    "outage",
    [
        pytest.param(SHORT, id="short"),
        pytest.param(LONG, id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)]),
    ],
)
def test_after_a_broker_outage_fresh_readings_go_first_and_the_backlog_drains_in_order(
    rig_spec: RigSpec, tmp_path: Path, outage: Outage, new_cert: bool
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path, tuning=outage.tuning()) as rig:
            rig.require("broker")
            observer = rig.observer
            await rig.start_agent()
            await wait_until(
                lambda: len(observer.telemetry()) >= 3 and latest_connects(observer) >= 1,
                timeout_s=rig_spec.first_reading_s,
                what="telemetry and a health report before the outage",
            )
            sessions_before = latest_connects(observer)

            rig.broker_control.stop()
            await asyncio.sleep(outage.outage_s)  # the agent reads on, and spools
            await wait_until(  # a slow real rig may need longer to make a backlog worth judging
                lambda: len(read_spool(rig.spool_path).outbox) >= outage.min_backlog,
                timeout_s=BACKLOG_TIMEOUT_S,
                what=f"{outage.min_backlog} messages in the agent's outbox",
                poll_s=0.5,
            )
            spooled = set(read_spool(rig.spool_path).outbox)  # backlog, whatever comes next
            if new_cert:
                rig.broker_control.restart(new_cert=True)
            else:
                rig.broker_control.start()
            restored = len(observer.arrivals)

            await wait_until(
                lambda: latest_connects(observer) > sessions_before,
                timeout_s=30.0,
                what="the agent's new session (a health report with a higher connects count)",
            )
            reconnected = session_reports(observer, after=restored - 1)[0]
            await wait_until(
                lambda: drained(rig, sessions_before),
                timeout_s=outage.drain_timeout_s,
                what="the backlog drained (a health report with an empty outbox)",
            )
            await stop_and_account(rig)
            assert rig.broker_control.certificates_issued == (1 if new_cert else 0)

            after = [c for c in first_copies(observer) if c.arrival.index >= restored]
            check_backlog(outage, after, reconnected, spooled)

    asyncio.run(scenario())


def drained(rig: Rig, sessions_before: int) -> bool:
    """The latest health report comes from a session after the outage and says the outbox
    holds at most a message or two (fresh ones in flight): the backlog is gone."""
    packs = rig.observer.health()
    if not packs or (connects(packs[-1]) or 0) <= sessions_before:
        return False
    left = packs[-1].value("agent", "spool_messages")
    return isinstance(left, int | float) and left <= 2


def check_backlog(
    outage: Outage, after: list[FirstCopy], reconnected: SignedPack, spooled: set[int]
) -> None:
    """Fresh first, the backlog in seq order, at a bounded rate (measured and printed).

    `after` is the telemetry first received since the broker came back;
    `reconnected` the health report that opened the agent's new session;
    `spooled` the outbox's seqs while the broker was still away.
    """
    since = wall_time(reconnected.arrival)
    backlog = [c for c in after if c.message.seq in spooled]
    fresh = [c for c in after if min(r.t for r in c.message.records) > since]
    assert len(backlog) >= outage.min_backlog, f"too small a backlog: {len(backlog)} messages"
    assert fresh, "no message of readings taken after the reconnection arrived"
    first_fresh, last = fresh[0], backlog[-1]
    span = last.arrival.at - backlog[0].arrival.at
    rate = (len(backlog) - 1) / span if span > 0 else math.inf
    print(
        f"\noutage {outage.outage_s:g} s: {len(backlog)} backlog messages "
        f"(outbox at reconnection: {reconnected.value('agent', 'spool_messages')}), "
        f"drained at {rate:.2f} msg/s (configured {outage.backlog_per_s:g}, burst "
        f"{outage.burst}) over {span:.1f} s; the first fresh message arrived "
        f"{first_fresh.arrival.at - reconnected.arrival.at:.2f} s after the new session's "
        f"report, after {count_before(backlog, first_fresh)} backlog messages"
    )
    seqs = [c.message.seq for c in backlog]
    assert seqs == sorted(seqs), f"the backlog arrived out of seq order: {seqs}"
    allowed = outage.burst + RATE_MARGIN * outage.backlog_per_s * (span + OBSERVER_LAG_S)
    assert len(backlog) - 1 <= allowed, (
        f"{len(backlog)} backlog messages in {span:.2f} s: more than the configured "
        f"{outage.backlog_per_s:g} msg/s allows ({allowed:.1f})"
    )
    assert first_fresh.arrival.index < last.arrival.index, (
        f"fresh readings waited for the whole backlog: the first fresh message (seq "
        f"{first_fresh.message.seq}) arrived after the last backlog one (seq {last.message.seq})"
    )


def count_before(backlog: list[FirstCopy], first: FirstCopy) -> int:
    return sum(1 for c in backlog if c.arrival.index < first.arrival.index)
