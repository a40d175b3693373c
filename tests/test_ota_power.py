"""A power cut of the running agent at each step of an update it is making.

The gateway of tests/test_ota_e2e.py (release 1.0.0 publishing, 1.0.1 offered
in a repository directory) takes an `ota/offer`; the agent's update flow
SIGKILLs its whole process at one step (the flow's test-rig fault injector,
CITYGATE_OTA_KILL_AT, set for the first run only), and the supervisor starts
whatever `current` then points to, as systemd would after a power cut. Each
time the gateway must boot into a working release and finish the update by
itself: 1.0.1 ends committed, no half-built release is left, and every reading
and message the killed run had committed to its spool reaches the verifier
(messages byte-identical).

`make test` runs two steps (mid-download, and between the switch and its record,
where the new release must finish the switch and start its own trial); `--long`
runs all eleven. tests/test_ota_flow.py kills the command-line flow at every step.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from agent.ota.flow import KILL_ENV
from agent.ota.release import Releases
from hil_tests.observe import Observer
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import SpoolSnapshot, read_spool
from tests.ota_gateway import NEW, OLD, events, gateway, offer, publishing
from tests.ota_supervisor import Start, Supervisor

pytestmark = pytest.mark.integration

SHORT = ["downloading", "switching/done"]
LONG = [
    "checking",
    "checking/done",
    "downloading/done",
    "installing",
    "installing/done",
    "selftest",
    "selftest/done",
    "switching",
    "trial",
]


@pytest.mark.parametrize(
    "point", [*SHORT, *(pytest.param(p, marks=pytest.mark.long) for p in LONG)]
)
def test_a_power_cut_at_a_step_of_the_update_loses_nothing_and_the_update_completes(
    point: str,
    ota_bundles: dict[str, Path],
    ota_lab: LabFiles,
    ota_broker: LabBroker,
    tmp_path: Path,
) -> None:
    root, repo = gateway(tmp_path, ota_bundles)
    lab, broker = ota_lab, ota_broker
    spool = tmp_path / "state" / "spool.sqlite"
    cut: list[SpoolSnapshot] = []

    def after(start: Start) -> None:
        if start.exit_code == -signal.SIGKILL:
            cut.append(read_spool(spool))  # what the killed run had committed

    async def scenario() -> tuple[Supervisor, Observer]:
        async with publishing(
            tmp_path, lab, broker, (root, repo), seed=21, first_env={KILL_ENV: point}, on_exit=after
        ) as gw:
            await offer(lab, broker, NEW)
            await gw.until(
                lambda: ("ota_committed", NEW) in events(gw.observer),
                f"1.0.1 committed after a power cut at {point}",
                240,
            )
            await gw.more_telemetry(20, "telemetry of 1.0.1")
        return gw.supervisor, gw.observer

    supervisor, observer = asyncio.run(scenario())
    log = (tmp_path / "agent.log").read_text(errors="replace")
    runs = [(s.release, s.exit_code) for s in supervisor.starts]
    assert runs[0] == (OLD, -signal.SIGKILL), (runs, log[-3000:])
    assert runs[-1] == (NEW, 0), runs
    assert all(code in (75, -signal.SIGKILL) for _, code in runs[1:-1]), runs
    releases = Releases(root)
    assert (releases.current(), releases.committed()) == (NEW, NEW)
    assert sorted(p.name for p in (root / "releases").iterdir()) == [OLD, NEW]  # no leftovers
    assert not list((tmp_path / "state" / "ota" / "unpack").glob("*"))
    # what the cut run had committed arrived: messages as they were signed, readings in some
    assert len(cut) == 1
    for seq, payload in cut[0].outbox.items():
        assert payload in observer.capture.raw[("gw-a", seq)], seq
    assert cut[0].readings <= observer.capture.readings()
    assert observer.failures == []
    assert observer.differing_duplicates() == []
