"""An update of a running gateway, end to end, with the real parts.

Two real bundles of this checkout (1.0.0 and 1.0.1, every wheel) are built
with `python -m images.bundle`, 1.0.1 is published with `python -m images.repo`
into a repository directory (a technician's USB stick), and 1.0.0 is installed
as a release root. The agent runs from `<root>/current` under a supervisor that
does what the systemd unit does (tests/ota_supervisor.py), reads an emulated
PMS5003, and publishes to a real mosquitto with mTLS, where a verifying
subscriber checks and counts everything. An operator's `ota/offer` starts the
update; the agent downloads, verifies, installs, self-tests and switches while
it keeps publishing, exits 75, and the new release starts on trial.

- test_update_while_publishing: the trial passes (a signed health report
  acknowledged) and 1.0.1 commits itself; every reading either run accepted
  arrives exactly once; the downtime (the gap in telemetry) is printed.
- test_release_that_cannot_connect_is_rolled_back: the broker is unreachable
  while 1.0.1 is on trial; at the deadline it switches back to 1.0.0 and
  restarts; 1.0.1 is refused from then on; nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.ota.release import Releases
from hil_tests.observe import Observer
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.ota_gateway import (
    NEW,
    OLD,
    accepted,
    events,
    gateway,
    offer,
    online_versions,
    publishing,
    run_python,
    telemetry_gaps,
)
from tests.ota_supervisor import Supervisor

pytestmark = pytest.mark.integration


def test_update_while_publishing(
    ota_bundles: dict[str, Path], ota_lab: LabFiles, ota_broker: LabBroker, tmp_path: Path
) -> None:
    root, repo = gateway(tmp_path, ota_bundles)
    lab, broker = ota_lab, ota_broker

    async def scenario() -> dict[str, Any]:
        async with publishing(tmp_path, lab, broker, (root, repo), seed=11) as gw:
            await offer(lab, broker, NEW)
            await gw.until(
                lambda: ("ota_committed", NEW) in events(gw.observer), "1.0.1 committed", 240
            )
            switched = gw.supervisor.starts[-1].started_mono
            await gw.more_telemetry(30, "telemetry of 1.0.1")
        return {"supervisor": gw.supervisor, "observer": gw.observer, "switched": switched}

    found = asyncio.run(scenario())
    supervisor: Supervisor = found["supervisor"]
    observer: Observer = found["observer"]
    log = (tmp_path / "agent.log").read_text(errors="replace")

    assert [s.release for s in supervisor.starts] == [OLD, NEW], log[-3000:]
    assert [s.exit_code for s in supervisor.starts] == [75, 0]
    releases = Releases(root)
    assert (releases.current(), releases.committed()) == (NEW, NEW)
    assert OLD in releases.installed()  # the previous release is kept
    assert online_versions(observer)[0] == OLD
    assert online_versions(observer)[-1] == NEW
    kinds = [kind for kind, subject in events(observer) if subject == NEW]
    for step in ("ota_verified", "ota_installed", "ota_switched", "ota_trial", "ota_committed"):
        assert step in kinds, kinds
    # every reading accepted by either run arrived, once, byte-identical copies only
    assert observer.failures == []
    assert observer.differing_duplicates() == []
    assert not observer.repeated_readings()
    assert observer.readings_total() == accepted(supervisor)
    gaps = telemetry_gaps(observer)
    old_run = supervisor.starts[0]
    assert old_run.ended is not None
    # the downtime: from the last telemetry before the new release started to the first after
    restart_gap = next(b - a for a, b in gaps if a <= found["switched"] <= b)
    usual = sorted(b - a for a, b in gaps)[len(gaps) // 2]
    print(  # the figure the issue asks for (run with -s)
        f"\nupdate downtime (no telemetry published): {restart_gap:.2f} s; "
        f"median gap between telemetry messages {usual:.2f} s; "
        f"1.0.0 stopped {old_run.ended - old_run.started:.1f} s after it started, "
        f"{observer.readings_total()} readings delivered, {observer.duplicate_copies()} "
        "duplicate copies"
    )


def test_release_that_cannot_connect_is_rolled_back(
    ota_bundles: dict[str, Path], ota_lab: LabFiles, ota_broker: LabBroker, tmp_path: Path
) -> None:
    root, repo = gateway(tmp_path, ota_bundles)
    lab, broker = ota_lab, ota_broker

    async def scenario() -> tuple[Supervisor, Observer]:
        async with publishing(
            tmp_path, lab, broker, (root, repo), seed=12, trial_deadline_s=8.0
        ) as gw:
            await offer(lab, broker, NEW)
            await gw.until(lambda: Releases(root).current() == NEW, "the switch", 240)
            broker.stop()  # 1.0.1 cannot reach the broker during its trial
            await gw.until(
                lambda: len(gw.supervisor.starts) >= 3, "the rollback and the restart of 1.0.0"
            )
            broker.start()
            await gw.until(
                lambda: ("ota_rolled_back", NEW) in events(gw.observer), "the rollback reported"
            )
            await offer(lab, broker, NEW)  # a refused version is not tried again
            await asyncio.sleep(3)
        return gw.supervisor, gw.observer

    supervisor, observer = asyncio.run(scenario())
    log = (tmp_path / "agent.log").read_text(errors="replace")
    assert [s.release for s in supervisor.starts] == [OLD, NEW, OLD], log[-3000:]
    assert [s.exit_code for s in supervisor.starts] == [75, 75, 0]
    releases = Releases(root)
    assert (releases.current(), releases.committed()) == (OLD, OLD)
    status = json.loads(
        run_python(
            "-m", "agent.cli", "ota", "status", "--config", tmp_path / "gateway.toml", "--json"
        )
    )
    assert NEW in json.dumps(status.get("refused")), status
    assert os.readlink(root / "current").endswith(OLD)
    assert "trial deadline" in log
    assert observer.failures == []
    assert observer.differing_duplicates() == []
    assert observer.readings_total() == accepted(supervisor)
