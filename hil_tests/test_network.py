"""Network faults (guarantee 5): reconnects with backoff, no tight loops, bounded memory.

The agent's only way to the broker is the rig's `NetProxy`, and the scenario
breaks it in each of the ways a street gateway's link breaks, one after the
other, while the agent keeps reading:

- cut: connections closed, new ones refused (a modem down). The agent's
  connection attempts during the cut (one "retrying in" line of its log each:
  a refused connect never reaches the proxy's counter) must be at least what a
  live reconnect loop makes and at most a few times what the configured
  exponential backoff with full jitter makes on average: far below a tight loop;
- blackhole: connections accepted but no byte moves. The keep-alive (5 s) must
  notice the dead session; the proof is a new connection attempt at the proxy.
  Attempts through the blackhole (the proxy counts those) stay bounded too;
- slow: a few KB/s. Telemetry must keep arriving through it;
- reset: an RST to both ends; the agent must come back at once.

After each fault the agent must open a new session (a health report with a
higher `connects` count). While it is disconnected (the cut, and the blackhole
once noticed) its CPU time must stay under 5 % of a core; its resident memory,
sampled throughout, must stay within 20 % of the steady value measured before
the first fault, and it must hold no more open descriptors after the faults
than before (a session's sockets are closed when it ends). At the clean stop
every reading it accepted must have arrived exactly once, per sensor in time
order, with nothing left spooled.

Figures (attempts, CPU fractions, RSS, descriptors) are printed for `pytest -s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.backoff import FLOOR_S, Backoff
from hil_tests.delivery import latest_connects, stop_and_account
from hil_tests.observe import ProcessProbe, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec

pytestmark = pytest.mark.integration

#: CPU time over elapsed time while the link is down (a fraction of one core)
CPU_DISCONNECTED_MAX = 0.05
#: resident memory may grow this much over its steady value (a bound, not a figure)
RSS_GROWTH_MAX = 0.20
#: descriptors the agent may hold beyond its count before the faults (both counted while
#: connected): every session's sockets must be closed when it ends, not when collected
FD_SLACK = 2
#: a cut's connection attempts may be this many times the backoff's average count (plus a few)
ATTEMPTS_FACTOR = 3.0
#: the agent's log line for each failed connection attempt (agent.uplink.Uplink.run)
RETRY_LINE = "; retrying in "
#: what the slow link lets through, each way, per connection
SLOW_BYTES_PER_S = 4096.0
#: how long the agent may take to notice a blackhole (keep-alive 5 s: a ping, then the verdict)
NOTICE_TIMEOUT_S = 30.0
#: how long the agent may take to open a new session once the link is back
RECONNECT_TIMEOUT_S = 30.0
_SAMPLE_S = 0.25


@dataclass(frozen=True)
class Plan:
    """How many rounds of the four faults, and how long each fault lasts."""

    rounds: int
    cut_s: float
    blackhole_s: float  # after the agent noticed it
    slow_s: float
    warmup_s: float


SHORT = Plan(rounds=1, cut_s=3.0, blackhole_s=3.5, slow_s=3.0, warmup_s=1.5)
LONG = Plan(rounds=8, cut_s=20.0, blackhole_s=15.0, slow_s=20.0, warmup_s=10.0)


@dataclass
class Figures:
    """What the scenario measured, printed at the end."""

    cut_attempts: list[int] = field(default_factory=list)
    blackhole_attempts: list[int] = field(default_factory=list)
    cpu_cut: list[float] = field(default_factory=list)
    cpu_blackhole: list[float] = field(default_factory=list)
    noticed_s: list[float] = field(default_factory=list)
    slow_messages: list[int] = field(default_factory=list)

    def report(self, steady_rss: float, max_rss: int, fds: tuple[int, int]) -> str:
        def listed(values: list[float] | list[int]) -> str:
            return ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values)

        return (
            f"\nconnection attempts per cut: {listed(self.cut_attempts)}; "
            f"through the blackhole: {listed(self.blackhole_attempts)}\n"
            f"blackhole noticed after (s): {listed(self.noticed_s)}\n"
            f"CPU fraction while cut: {listed(self.cpu_cut)}; "
            f"while blackholed: {listed(self.cpu_blackhole)}\n"
            f"telemetry messages through the slow link: {listed(self.slow_messages)}\n"
            f"RSS steady {steady_rss / 2**20:.1f} MiB, max {max_rss / 2**20:.1f} MiB "
            f"({max_rss / steady_rss - 1:+.1%}); open descriptors {fds[0]} -> {fds[1]}"
        )


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(SHORT, id="short"),
        pytest.param(LONG, id="long", marks=[pytest.mark.long, pytest.mark.timeout(3600)]),
    ],
)
def test_the_agent_rides_out_cuts_blackholes_slow_links_and_resets(
    rig_spec: RigSpec, tmp_path: Path, plan: Plan
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("network")
            await rig.start_agent()
            await wait_until(
                lambda: len(rig.observer.telemetry()) >= 3 and latest_connects(rig.observer) >= 1,
                timeout_s=rig_spec.first_reading_s,
                what="telemetry and a health report before the faults",
            )
            steady = await steady_rss(rig.probe(), plan.warmup_s)
            fds_before = open_descriptors(rig.pid)
            memory = rig.probe()
            sampler = asyncio.create_task(sample_forever(memory), name="rss-sampler")
            figures = Figures()
            try:
                for _ in range(plan.rounds):
                    await cut(rig, plan, figures)
                    await blackhole(rig, plan, figures)
                    await slow(rig, plan, figures)
                    await reset(rig)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            max_rss = max(s.rss_bytes for s in memory.samples)
            fds_after = open_descriptors(rig.pid)
            print(figures.report(steady, max_rss, (fds_before, fds_after)))
            assert max_rss <= steady * (1 + RSS_GROWTH_MAX), (
                f"RSS grew from a steady {steady / 2**20:.1f} MiB to {max_rss / 2**20:.1f} MiB"
            )
            assert fds_after <= fds_before + FD_SLACK, (
                f"open descriptors grew from {fds_before} to {fds_after} over the faults"
            )
            await stop_and_account(rig)

    asyncio.run(scenario())


# -- the faults ------------------------------------------------------------------------------


async def cut(rig: Rig, plan: Plan, figures: Figures) -> None:
    """Cut the link for `plan.cut_s`: bounded attempts, idle CPU, then a new session."""
    sessions = latest_connects(rig.observer)
    logged = len(rig.agent_log())
    rig.proxy.cut()
    cpu = await idle_cpu(rig.probe(), plan.cut_s)
    rig.proxy.restore()
    attempts = rig.agent_log()[logged:].count(RETRY_LINE)
    figures.cut_attempts.append(attempts)
    figures.cpu_cut.append(cpu)
    backoff = agent_backoff(rig)
    least, most = attempts_range(backoff, plan.cut_s)
    assert least <= attempts <= most, (
        f"{attempts} connection attempts in a {plan.cut_s:g} s cut; backoff "
        f"{backoff.initial_s:g}..{backoff.max_s:g} s with full jitter allows {least}..{most}"
    )
    assert cpu < CPU_DISCONNECTED_MAX, f"{cpu:.1%} of a core while the link was cut"
    await new_session(rig, sessions, "after the cut")


async def blackhole(rig: Rig, plan: Plan, figures: Figures) -> None:
    """Blackhole the link: the keep-alive notices, attempts stay bounded, CPU idle."""
    sessions = latest_connects(rig.observer)
    connections = rig.proxy.connections
    rig.proxy.blackhole()
    since = asyncio.get_running_loop().time()
    await wait_until(
        lambda: rig.proxy.connections > connections,
        timeout_s=NOTICE_TIMEOUT_S,
        what="the agent noticing the blackholed session (keep-alive) and trying again",
    )
    noticed = rig.proxy.connections
    figures.noticed_s.append(asyncio.get_running_loop().time() - since)
    cpu = await idle_cpu(rig.probe(), plan.blackhole_s)
    attempts = rig.proxy.connections - noticed + 1  # the one that showed it noticed
    rig.proxy.restore()
    figures.blackhole_attempts.append(attempts)
    figures.cpu_blackhole.append(cpu)
    _, most = attempts_range(agent_backoff(rig), plan.blackhole_s)
    assert attempts <= most, f"{attempts} connection attempts in a {plan.blackhole_s:g} s blackhole"
    assert cpu < CPU_DISCONNECTED_MAX, f"{cpu:.1%} of a core while the link was blackholed"
    await new_session(rig, sessions, "after the blackhole")


async def slow(rig: Rig, plan: Plan, figures: Figures) -> None:
    """Slow the link to a few KB/s for `plan.slow_s`: telemetry keeps flowing."""
    before = len(rig.observer.telemetry())
    rig.proxy.slow(SLOW_BYTES_PER_S)
    await asyncio.sleep(plan.slow_s)
    through = len(rig.observer.telemetry()) - before
    rig.proxy.restore()
    figures.slow_messages.append(through)
    assert through > 0, f"no telemetry through a {SLOW_BYTES_PER_S:g} B/s link in {plan.slow_s} s"


async def reset(rig: Rig) -> None:
    """Reset the connection (RST both ways): a new session follows at once."""
    sessions = latest_connects(rig.observer)
    rig.proxy.reset()
    await new_session(rig, sessions, "after the reset")


async def new_session(rig: Rig, sessions: int, when: str) -> None:
    """Wait for a health report with a `connects` count above `sessions`, then telemetry."""
    await wait_until(
        lambda: latest_connects(rig.observer) > sessions,
        timeout_s=RECONNECT_TIMEOUT_S,
        what=f"a new session {when} (a health report with connects > {sessions})",
    )
    messages = len(rig.observer.telemetry())
    await wait_until(
        lambda: len(rig.observer.telemetry()) > messages,
        timeout_s=RECONNECT_TIMEOUT_S,
        what=f"telemetry on the new session {when}",
    )


# -- measuring ---------------------------------------------------------------------------------


def agent_backoff(rig: Rig) -> Backoff:
    """The reconnect backoff the rig configured the agent with."""
    broker = rig.tuning["broker"]
    return Backoff(float(str(broker["backoff_initial_s"])), float(str(broker["backoff_max_s"])))


def attempts_range(backoff: Backoff, seconds: float) -> tuple[int, int]:
    """How many connection attempts a link down for `seconds` may see: at least one per
    one and a half longest delays (the loop is alive; an attempt takes time too), at most
    `ATTEMPTS_FACTOR` times as many as the backoff's average delays fit in, plus a few
    (far below a loop without backoff)."""
    least = max(1, int(seconds / (1.5 * backoff.max_s)))
    elapsed, expected = 0.0, 0
    while elapsed < seconds:
        ceiling = backoff.ceiling(expected)
        elapsed += mean_delay(ceiling)
        expected += 1
    return least, int(ATTEMPTS_FACTOR * expected) + 3


def mean_delay(ceiling: float) -> float:
    """The mean of max(FLOOR_S, uniform(0, ceiling)): full jitter with the backoff's floor."""
    if ceiling <= FLOOR_S:
        return FLOOR_S
    return (ceiling**2 + FLOOR_S**2) / (2 * ceiling)


async def idle_cpu(probe: ProcessProbe, seconds: float) -> float:
    """The agent's CPU fraction over the next `seconds`."""
    probe.sample()
    await asyncio.sleep(seconds)
    probe.sample()
    return probe.cpu_fraction()


async def steady_rss(probe: ProcessProbe, seconds: float) -> float:
    """The agent's resident memory at rest: the median of samples over `seconds`."""
    await sample_for(probe, seconds)
    return statistics.median(s.rss_bytes for s in probe.samples)


async def sample_for(probe: ProcessProbe, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        probe.sample()
        await asyncio.sleep(_SAMPLE_S)


async def sample_forever(probe: ProcessProbe) -> None:
    while True:
        probe.sample()
        await asyncio.sleep(_SAMPLE_S)


def open_descriptors(pid: int) -> int:
    """The process's open file descriptors (sockets included), from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))
