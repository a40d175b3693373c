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
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt import Session
from agent.ota.bundle import unpack
from agent.ota.release import Releases
from drivers.pms5003.emulator import Pms5003Emulator
from hil_tests.observe import Observer, wait_until
from provisioning.broker import LabBroker
from provisioning.labconfig import LAB_TUNING, write_gateway_config
from provisioning.pki import LabFiles, make_lab_pki
from tests.ota_supervisor import Supervisor

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
OLD, NEW = "1.0.0", "1.0.1"


def _python(*args: str | Path, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def bundles(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Bundles of this checkout at two versions; dependency wheels kept in pytest's cache."""
    out = tmp_path_factory.mktemp("bundles")
    assert request.config.cache is not None
    cache = request.config.cache.mkdir("citygate-bundle-e2e")
    built = {}
    for version in (OLD, NEW):
        path = out / f"citygate-{version}.bundle"
        _python("-m", "images.bundle", "build", "--version", version, "--out", path,
                "--cache", cache)  # fmt: skip
        built[version] = path
    return built


@pytest.fixture(scope="module")
def operator_lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    return make_lab_pki(tmp_path_factory.mktemp("pki"), clients=["gw-a", "verifier", "operator"])


@pytest.fixture
def ops_broker(operator_lab: LabFiles, tmp_path: Path) -> Iterator[LabBroker]:
    with LabBroker(
        tmp_path / "broker",
        ca_cert=operator_lab.ca_cert,
        server_cert=operator_lab.server_cert,
        server_key=operator_lab.server_key,
        operators=["operator"],
    ) as running:
        yield running


def _gateway(tmp: Path, bundles: dict[str, Path]) -> tuple[Path, Path]:
    """A release root with OLD installed and committed, and a repository offering NEW."""
    root, repo = tmp / "opt", tmp / "usb"
    manifest = unpack(bundles[OLD], tmp / "unpack-old")
    releases = Releases(root)
    releases.install(tmp / "unpack-old", manifest)
    releases.switch(OLD)
    releases.commit(OLD)
    _python("-m", "images.repo", "init", repo)
    _python("-m", "images.repo", "add", repo, bundles[NEW])
    return root, repo


def _config(
    tmp: Path,
    lab: LabFiles,
    broker: LabBroker,
    port: str,
    gateway: tuple[Path, Path],
    deadline_s: float,
) -> Path:
    root, repo = gateway
    ota = {
        "repo": str(repo),
        "root": str(root),
        "trusted_root": str(repo / "metadata" / "1.root.json"),
        "check_interval_s": 0,
        "trial_deadline_s": deadline_s,
    }
    return write_gateway_config(
        tmp / "gateway.toml",
        lab=lab,
        gateway="gw-a",
        broker_port=broker.port,
        state_dir=tmp / "state",
        sensors={"air_1": {"driver": "pms5003", "port": port}},
        tuning={**LAB_TUNING, "ota": ota, "health": {"interval_s": 5.0}},
    )


async def _offer(lab: LabFiles, broker: LabBroker, version: str) -> None:
    """What an operator does: a hint on <prefix>/<gw>/ota/offer (trust never comes from it)."""
    cert, key = lab.clients["operator"]
    settings = broker.session_settings(cert, key, lab.ca_cert, client_id="operator")
    session = await Session.open(settings)
    try:
        await session.publish("citygate/gw-a/ota/offer", json.dumps({"version": version}).encode())
    finally:
        await session.close()


def _events(observer: Observer) -> list[tuple[str, str]]:
    """(kind, subject) of every verified event, in order."""
    found = []
    for pack in observer.events():
        for subject, records in pack.subjects().items():
            if "event" in records:
                found.append((str(records["event"]), subject))
    return found


def _online_versions(observer: Observer) -> list[object]:
    return [s.get("version") for s in observer.statuses() if s.get("state") == "online"]


def _accepted(supervisor: Supervisor) -> int:
    """Readings the runs accepted, from the summary each wrote when it stopped."""
    total = 0
    for start in supervisor.starts:
        assert start.summary is not None, f"run of {start.release} wrote no summary"
        total += int(start.summary["accepted"])
        assert start.summary["spooled_readings"] == 0 or start.exit_code == 75
    return total


def _telemetry_gaps(observer: Observer) -> list[tuple[float, float]]:
    """(from, to) monotonic times of consecutive telemetry arrivals."""
    times = [a.at for a in observer.arrivals if a.kind == "telemetry" and a.message is not None]
    return list(itertools.pairwise(times))


async def _drain(observer: Observer, sensor: Pms5003Emulator, supervisor: Supervisor) -> None:
    sensor.set_silent(True)
    await asyncio.sleep(1.5)  # the agent reads what is still in the pty, packs and sends it
    await supervisor.stop()
    await asyncio.sleep(0.5)
    await observer.stop()


def test_update_while_publishing(
    bundles: dict[str, Path], operator_lab: LabFiles, ops_broker: LabBroker, tmp_path: Path
) -> None:
    root, repo = _gateway(tmp_path, bundles)
    lab, broker = operator_lab, ops_broker

    async def scenario() -> dict[str, Any]:
        observer = Observer(lab, broker, ["gw-a"])
        await observer.start()
        with Pms5003Emulator(period_s=0.1, seed=11, wait_for_host=True) as sensor:
            config = _config(tmp_path, lab, broker, sensor.port, (root, repo), 120.0)
            supervisor = Supervisor(
                root, config, tmp_path / "agent.log", summary=tmp_path / "state" / "last-run.json"
            )
            supervisor.start()
            try:
                await wait_until(
                    lambda: observer.readings_total() >= 30, timeout_s=60, what="telemetry of 1.0.0"
                )
                await _offer(lab, broker, NEW)
                await wait_until(
                    lambda: ("ota_committed", NEW) in _events(observer),
                    timeout_s=240,
                    what="1.0.1 committed",
                )
                switched = supervisor.starts[-1].started_mono
                before = observer.readings_total()
                await wait_until(
                    lambda: observer.readings_total() >= before + 30,
                    timeout_s=30,
                    what="telemetry of 1.0.1",
                )
            finally:
                await _drain(observer, sensor, supervisor)
        return {"supervisor": supervisor, "observer": observer, "switched": switched}

    found = asyncio.run(scenario())
    supervisor: Supervisor = found["supervisor"]
    observer: Observer = found["observer"]
    log = (tmp_path / "agent.log").read_text(errors="replace")

    assert [s.release for s in supervisor.starts] == [OLD, NEW], log[-3000:]
    assert [s.exit_code for s in supervisor.starts] == [75, 0]
    releases = Releases(root)
    assert (releases.current(), releases.committed()) == (NEW, NEW)
    assert OLD in releases.installed()  # the previous release is kept
    assert _online_versions(observer)[0] == OLD
    assert _online_versions(observer)[-1] == NEW
    kinds = [kind for kind, subject in _events(observer) if subject == NEW]
    for step in ("ota_verified", "ota_installed", "ota_switched", "ota_trial", "ota_committed"):
        assert step in kinds, kinds
    # every reading accepted by either run arrived, once, byte-identical copies only
    assert observer.failures == []
    assert observer.differing_duplicates() == []
    assert not observer.repeated_readings()
    assert observer.readings_total() == _accepted(supervisor)
    gaps = _telemetry_gaps(observer)
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
    bundles: dict[str, Path], operator_lab: LabFiles, ops_broker: LabBroker, tmp_path: Path
) -> None:
    root, repo = _gateway(tmp_path, bundles)
    lab, broker = operator_lab, ops_broker

    async def scenario() -> tuple[Supervisor, Observer]:
        observer = Observer(lab, broker, ["gw-a"])
        await observer.start()
        with Pms5003Emulator(period_s=0.1, seed=12, wait_for_host=True) as sensor:
            config = _config(tmp_path, lab, broker, sensor.port, (root, repo), 8.0)
            supervisor = Supervisor(
                root, config, tmp_path / "agent.log", summary=tmp_path / "state" / "last-run.json"
            )
            supervisor.start()
            try:
                await wait_until(
                    lambda: observer.readings_total() >= 30, timeout_s=60, what="telemetry of 1.0.0"
                )
                await _offer(lab, broker, NEW)
                await wait_until(
                    lambda: Releases(root).current() == NEW, timeout_s=240, what="the switch"
                )
                broker.stop()  # 1.0.1 cannot reach the broker during its trial
                await wait_until(
                    lambda: len(supervisor.starts) >= 3,
                    timeout_s=60,
                    what="the rollback and the restart of 1.0.0",
                )
                broker.start()
                await wait_until(
                    lambda: ("ota_rolled_back", NEW) in _events(observer),
                    timeout_s=60,
                    what="the rollback reported",
                )
                await _offer(lab, broker, NEW)  # a refused version is not tried again
                await asyncio.sleep(3)
            finally:
                await _drain(observer, sensor, supervisor)
        return supervisor, observer

    supervisor, observer = asyncio.run(scenario())
    log = (tmp_path / "agent.log").read_text(errors="replace")
    assert [s.release for s in supervisor.starts] == [OLD, NEW, OLD], log[-3000:]
    assert [s.exit_code for s in supervisor.starts] == [75, 75, 0]
    releases = Releases(root)
    assert (releases.current(), releases.committed()) == (OLD, OLD)
    status = json.loads(
        _python("-m", "agent.cli", "ota", "status", "--config", tmp_path / "gateway.toml", "--json")
    )
    assert NEW in json.dumps(status.get("refused")), status
    assert os.readlink(root / "current").endswith(OLD)
    assert "trial deadline" in log
    assert observer.failures == []
    assert observer.differing_duplicates() == []
    assert observer.readings_total() == _accepted(supervisor)
