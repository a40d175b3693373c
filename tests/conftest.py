"""Shared fixtures: a lab PKI, a real mosquitto with mTLS, and a leak check.

Every test is checked for threads and child processes it left running: a
test that leaves something behind fails, whatever it asserted.
"""

from __future__ import annotations

import contextlib
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
