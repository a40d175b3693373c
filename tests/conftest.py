"""Shared fixtures: a lab PKI, a real mosquitto with mTLS, and a leak check.

Every test is checked for threads and child processes it left running: a
test that leaves something behind fails, whatever it asserted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.broker import LabBroker
from provisioning.pki import LabFiles, make_lab_pki

GATEWAYS = ("gw-a", "gw-b")


def _children() -> set[int]:
    pids: set[int] = set()
    task_dir = Path(f"/proc/{os.getpid()}/task")
    for task in task_dir.iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split())
    return pids


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a thread or a child process running."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in children:  # do not let one failing test poison the next (a stray agent on a pty)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    pytest.fail(f"test left running: threads {[t.name for t in threads]}, processes {children}")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    """A throwaway CA with a broker certificate and clients gw-a, gw-b and verifier."""
    return make_lab_pki(tmp_path_factory.mktemp("pki"), clients=[*GATEWAYS, "verifier"])


@pytest.fixture(scope="session")
def other_lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    """A second, unrelated CA: its certificates must be refused everywhere."""
    return make_lab_pki(tmp_path_factory.mktemp("other-pki"), clients=["gw-a"])


@pytest.fixture
def broker(lab: LabFiles, tmp_path: Path) -> Iterator[LabBroker]:
    """A real mosquitto on a free loopback port: mTLS required, per-gateway ACL."""
    with LabBroker(
        tmp_path / "broker",
        ca_cert=lab.ca_cert,
        server_cert=lab.server_cert,
        server_key=lab.server_key,
    ) as running:
        yield running


# -- updates (tests/test_ota_e2e.py, tests/test_ota_power.py; helpers in tests/ota_gateway.py) --


@pytest.fixture(scope="session")
def ota_bundles(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Real bundles of this checkout at versions OLD and NEW (every wheel), built with
    `python -m images.bundle`; dependency wheels are kept in pytest's cache, and a lock
    keeps two workers from building into it at once."""
    from tests.ota_gateway import NEW, OLD, run_python

    out = tmp_path_factory.mktemp("bundles")
    assert request.config.cache is not None
    cache = request.config.cache.mkdir("citygate-bundle-e2e")
    built = {}
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for version in (OLD, NEW):
            path = out / f"citygate-{version}.bundle"
            run_python("-m", "images.bundle", "build", "--version", version, "--out", path,
                   "--cache", cache)  # fmt: skip
            built[version] = path
    return built


@pytest.fixture(scope="session")
def ota_lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    """A lab PKI with an operator, the client allowed to send `ota/offer`."""
    return make_lab_pki(
        tmp_path_factory.mktemp("ota-pki"), clients=["gw-a", "verifier", "operator"]
    )


@pytest.fixture
def ota_broker(ota_lab: LabFiles, tmp_path: Path) -> Iterator[LabBroker]:
    with LabBroker(
        tmp_path / "broker",
        ca_cert=ota_lab.ca_cert,
        server_cert=ota_lab.server_cert,
        server_key=ota_lab.server_key,
        operators=["operator"],
    ) as running:
        yield running
