"""A gateway for update tests: a release root, an update repository, a config, and
what tests read from the verifying observer (tests/test_ota_e2e.py, test_ota_power.py).

The bundles and the broker with an operator are fixtures in tests/conftest.py
(`ota_bundles`, `ota_lab`, `ota_broker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.mqtt import Session
from agent.ota.bundle import unpack
from agent.ota.release import Releases
from drivers.pms5003.emulator import Pms5003Emulator
from hil_tests.observe import Observer, wait_until
from provisioning.broker import LabBroker
from provisioning.labconfig import LAB_TUNING, write_gateway_config
from provisioning.pki import LabFiles
from tests.ota_supervisor import Start, Supervisor

ROOT = Path(__file__).resolve().parent.parent
OLD, NEW = "1.0.0", "1.0.1"


def run_python(*args: str | Path, timeout: float = 600) -> str:
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


def gateway(tmp: Path, bundles: dict[str, Path]) -> tuple[Path, Path]:
    """A release root with OLD installed and committed, and a repository offering NEW."""
    root, repo = tmp / "opt", tmp / "usb"
    manifest = unpack(bundles[OLD], tmp / "unpack-old")
    releases = Releases(root)
    releases.install(tmp / "unpack-old", manifest)
    releases.switch(OLD)
    releases.commit(OLD)
    run_python("-m", "images.repo", "init", repo)
    run_python("-m", "images.repo", "add", repo, bundles[NEW])
    return root, repo


def gateway_config(
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


async def offer(lab: LabFiles, broker: LabBroker, version: str) -> None:
    """What an operator does: a hint on <prefix>/<gw>/ota/offer (trust never comes from it)."""
    cert, key = lab.clients["operator"]
    settings = broker.session_settings(cert, key, lab.ca_cert, client_id="operator")
    session = await Session.open(settings)
    try:
        await session.publish("citygate/gw-a/ota/offer", json.dumps({"version": version}).encode())
    finally:
        await session.close()


def events(observer: Observer) -> list[tuple[str, str]]:
    """(kind, subject) of every verified event, in order."""
    found = []
    for pack in observer.events():
        for subject, records in pack.subjects().items():
            if "event" in records:
                found.append((str(records["event"]), subject))
    return found


def online_versions(observer: Observer) -> list[object]:
    return [s.get("version") for s in observer.statuses() if s.get("state") == "online"]


def accepted(supervisor: Supervisor) -> int:
    """Readings the runs accepted, from the summary each wrote when it stopped."""
    total = 0
    for start in supervisor.starts:
        assert start.summary is not None, f"run of {start.release} wrote no summary"
        total += int(start.summary["accepted"])
        assert start.summary["spooled_readings"] == 0 or start.exit_code == 75
    return total


def telemetry_gaps(observer: Observer) -> list[tuple[float, float]]:
    """(from, to) monotonic times of consecutive telemetry arrivals."""
    times = [a.at for a in observer.arrivals if a.kind == "telemetry" and a.message is not None]
    return list(itertools.pairwise(times))


async def drain(observer: Observer, sensor: Pms5003Emulator, supervisor: Supervisor) -> None:
    sensor.set_silent(True)
    await asyncio.sleep(1.5)  # the agent reads what is still in the pty, packs and sends it
    await supervisor.stop()
    await asyncio.sleep(0.5)
    await observer.stop()


@dataclass
class Running:
    """A gateway at work: the verifying observer, its sensor, its supervisor."""

    observer: Observer
    sensor: Pms5003Emulator
    supervisor: Supervisor

    async def until(self, predicate: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        await wait_until(predicate, timeout_s=timeout_s, what=what)

    async def more_telemetry(self, readings: int, what: str) -> None:
        before = self.observer.readings_total()
        await self.until(lambda: self.observer.readings_total() >= before + readings, what, 30)


@contextlib.asynccontextmanager
async def publishing(
    tmp: Path,
    lab: LabFiles,
    broker: LabBroker,
    gateway: tuple[Path, Path],
    *,
    seed: int,
    trial_deadline_s: float = 120.0,
    first_env: Mapping[str, str] | None = None,
    on_exit: Callable[[Start], None] | None = None,
) -> AsyncIterator[Running]:
    """The gateway (release root, repository) running its current release under the
    supervisor and publishing (30 readings seen); drained and stopped on the way out."""
    observer = Observer(lab, broker, ["gw-a"])
    await observer.start()
    with Pms5003Emulator(period_s=0.1, seed=seed, wait_for_host=True) as sensor:
        config = gateway_config(tmp, lab, broker, sensor.port, gateway, trial_deadline_s)
        supervisor = Supervisor(
            gateway[0],
            config,
            tmp / "agent.log",
            summary=tmp / "state" / "last-run.json",
            first_env=dict(first_env or {}),
            on_exit=on_exit,
        )
        supervisor.start()
        try:
            running = Running(observer, sensor, supervisor)
            await running.until(lambda: observer.readings_total() >= 30, "telemetry of 1.0.0")
            yield running
        finally:
            await drain(observer, sensor, supervisor)
