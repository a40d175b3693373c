"""The injectors around the agent, each on its own: clock, disk, broker, power, /proc probe.

Each is shown on a small child process or a real mosquitto, as the agent
would meet it: a clock that reads 1970 and then jumps (monotonic time
untouched), a disk that refuses writes and takes them again, a broker that
comes back with another certificate from the same CA.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from agent.tls import verifier_context
from hil_tests.faults import BrokerControl, Disk, FakeClock, Power
from hil_tests.observe import ProcessProbe
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles, make_lab_pki

pytestmark = pytest.mark.integration

#: a child that answers one line per command read from stdin:
#: "time" -> "<time.time()> <time.monotonic()>"; "write N" -> "ok" or the errno
_CHILD = """
import os, sys, time
path = sys.argv[1]
for line in sys.stdin:
    command = line.split()
    if command[0] == "time":
        print(time.time(), time.monotonic(), flush=True)
    elif command[0] == "write":
        try:
            with open(path, "ab") as out:
                out.write(b"x" * int(command[1]))
                out.flush()
                os.fsync(out.fileno())
            print("ok", flush=True)
        except OSError as exc:
            print(exc.errno, flush=True)
"""


class _Child:
    def __init__(self, target: Path, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def child_factory() -> Iterator[list[_Child]]:
    children: list[_Child] = []
    yield children
    for child in children:
        child.close()


# -- clock ------------------------------------------------------------------------------------


@pytest.mark.skipif(not FakeClock.available(), reason="libfaketime is not installed")
def test_fake_clock_boots_in_1970_then_jumps_while_monotonic_time_stays_real(
    tmp_path: Path, child_factory: list[_Child]
) -> None:
    clock = FakeClock(tmp_path / "faketime")
    clock.boot_in_1970()
    child = _Child(tmp_path / "unused", clock.environment())
    child_factory.append(child)
    wall, monotonic = map(float, child.ask("time").split())
    assert wall < 365 * 86400  # within the first year after the epoch
    assert abs(monotonic - time.monotonic()) < 60  # the same CLOCK_MONOTONIC as ours
    clock.real()
    wall, _ = map(float, child.ask("time").split())
    assert abs(wall - time.time()) < 60
    clock.set_offset(3 * 86400)
    wall, _ = map(float, child.ask("time").split())
    assert abs(wall - (time.time() + 3 * 86400)) < 60


# -- disk ---------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_tmpfs_disk_refuses_writes_when_filled_and_takes_them_once_freed(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    with Disk(path, 1 << 20, mode="tmpfs") as disk:
        assert os.path.ismount(path)
        (path / "before").write_bytes(b"x" * 1000)
        disk.fill()
        assert disk.free_bytes() == 0
        with pytest.raises(OSError, match="No space left on device"):
            (path / "during").write_bytes(b"x" * 4096)
        disk.free()
        (path / "after").write_bytes(b"x" * 4096)
    assert not os.path.ismount(path)


def test_fsize_disk_stops_the_attached_process_growing_files_until_freed(
    tmp_path: Path, child_factory: list[_Child]
) -> None:
    with Disk(tmp_path / "spool", 1 << 20, mode="fsize") as disk:
        child = _Child(disk.path / "spool.sqlite")
        child_factory.append(child)
        disk.attach(child.proc.pid)
        assert child.ask("write 1000") == "ok"
        disk.fill()
        assert child.ask("write 1000") == str(errno.EFBIG)
        (disk.path / "ours").write_bytes(b"x" * 4096)  # only the attached process is limited
        disk.free()
        assert child.ask("write 1000") == "ok"


# -- broker -------------------------------------------------------------------------------------


def _served_certificate(lab: LabFiles, port: int) -> bytes:
    """The broker's certificate, from a handshake that verifies it against the lab CA."""
    cert, key = lab.clients["verifier"]
    context = verifier_context(cert, key, lab.ca_cert)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        served = tls.getpeercert(binary_form=True)
    assert served is not None
    return served


def test_broker_restarts_on_its_port_with_a_new_certificate_from_the_same_ca(
    tmp_path: Path,
) -> None:
    lab = make_lab_pki(tmp_path / "pki", clients=["verifier"])
    with LabBroker(
        tmp_path / "broker",
        ca_cert=lab.ca_cert,
        server_cert=lab.server_cert,
        server_key=lab.server_key,
    ) as broker:
        control = BrokerControl(broker, lab)
        before = _served_certificate(lab, broker.port)
        control.restart()
        assert _served_certificate(lab, broker.port) == before
        control.stop()
        assert not control.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", broker.port), timeout=5).close()
        control.start()
        control.restart(new_cert=True)
        after = _served_certificate(lab, broker.port)
    assert after != before
    assert control.certificates_issued == 1


# -- power and the process probe ----------------------------------------------------------------


def test_power_cut_comes_within_the_window_and_is_counted() -> None:
    cuts: list[float] = []

    async def kill() -> None:
        cuts.append(time.monotonic())

    power = Power(kill)
    waited = asyncio.run(power.kill_at_random(random.Random(7), within_s=0.05))
    assert 0.0 <= waited <= 0.05
    assert (len(cuts), power.cuts) == (1, 1)


def test_process_probe_reads_cpu_memory_and_bytes_written(
    tmp_path: Path, child_factory: list[_Child]
) -> None:
    child = _Child(tmp_path / "written")
    child_factory.append(child)
    probe = ProcessProbe(child.proc.pid)
    first = probe.sample()
    assert child.ask("write 1048576") == "ok"
    second = probe.sample()
    assert second.write_bytes - first.write_bytes >= 1 << 20
    assert second.rss_bytes > 1 << 20  # a Python interpreter is several MiB
    assert second.cpu_s > 0
    child.close()
    child_factory.remove(child)
    with pytest.raises(ProcessLookupError):
        probe.sample()
