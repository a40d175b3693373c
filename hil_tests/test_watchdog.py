"""The watchdog: the rig's agent under a stand-in for systemd's notify socket, stalled from outside.

The test binds the datagram socket systemd would (`$NOTIFY_SOCKET`, an
abstract AF_UNIX name) and gives the agent a watchdog (`$WATCHDOG_USEC`, no
`$WATCHDOG_PID`: the watchdog is the started process's). What arrives on the
socket is what systemd acts on: `READY=1` with a `STATUS=` line, `WATCHDOG=1`
at half the timeout, `STATUS=` whenever the line changes (the broker link
going and coming back shows in it), `STOPPING=1` at a clean stop.

Then the agent stalls, two ways, held for twice the watchdog timeout, which
is when systemd would have killed it; no ping may arrive while it is stalled,
and they resume when it is not:

- SIGSTOP: the whole process stops (every thread), then SIGCONT.
- A hung flash: the spool's filesystem is frozen (fsfreeze on an ext4 loop
  device, as root), so the event loop blocks in the kernel on its next
  SQLite write, as on an SD card that stops answering. Only the loop thread
  stalls: paho's network thread still answers the broker, so a ping sent from
  a thread would have told systemd the agent was fine. This needs root, loop
  devices, mkfs.ext4 and fsfreeze; without them it is skipped, saying which.

Either way the agent must lose nothing: after the stall and a clean stop
every reading it accepted reaches the observer. tests/test_sd_notify.py tests
the notifier itself and the agent's notices without a rig.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from hil_tests.observe import wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec

pytestmark = pytest.mark.integration

#: the watchdog timeout the agent is given: it pings every half of it
WATCHDOG_USEC = 1_000_000
WATCHDOG_S = WATCHDOG_USEC / 1e6
#: how long a stall is held: twice the timeout, so systemd would have acted on it
STALL_S = 2 * WATCHDOG_S
STATUS_LINE = re.compile(
    r"(connected|connecting) to \S+:\d+; \d+ reading\(s\) and \d+ message\(s\) spooled"
)
#: the size of the freezable flash filesystem (ext4 needs a few MiB for itself)
FLASH_BYTES = 16 << 20


@dataclass(frozen=True)
class Notice:
    """One datagram as systemd would read it: its KEY=value fields, and when it came."""

    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


class ServiceManager:
    """systemd's end of the notification protocol: a bound datagram socket (an abstract name,
    so no path length limit) that records every notice while the test's loop runs."""

    def __init__(self) -> None:
        self._name = f"citygate-hil-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.notices: list[Notice] = []

    def __enter__(self) -> Self:
        self._sock.bind("\0" + self._name)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self.receive)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()

    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self._name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def receive(self) -> None:
        """File every datagram waiting on the socket now (the loop also does, as they come)."""
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            lines = data.decode("utf-8", "replace").splitlines()
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            self.notices.append(Notice(time.monotonic(), fields))

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[Notice]:
        return [n for n in self.notices if "WATCHDOG" in n.fields and since <= n.at < until]

    def statuses(self) -> list[str]:
        """Every STATUS= line before the agent said it is stopping."""
        return [
            n.fields["STATUS"]
            for n in self.notices
            if "STATUS" in n.fields and "STOPPING" not in n.fields
        ]

    def first(self, key: str) -> Notice | None:
        return next((n for n in self.notices if key in n.fields), None)


class FrozenFlash:
    """A small ext4 filesystem on a loop device that can be frozen (fsfreeze): every write
    to it then waits in the kernel, uninterruptibly, until it is thawed."""

    TOOLS = ("mount", "umount", "mkfs.ext4", "fsfreeze")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._image = path.with_name(path.name + ".img")
        self._mounted = False
        self._frozen = False

    @classmethod
    def why_not(cls) -> str | None:
        """Why a frozen flash cannot be made here, or None if it can."""
        if os.geteuid() != 0:
            return "a frozen flash needs root (mount, fsfreeze)"
        missing = [tool for tool in cls.TOOLS if shutil.which(tool) is None]
        if missing:
            return f"a frozen flash needs {', '.join(missing)}"
        if not Path("/dev/loop-control").exists():
            return "a frozen flash needs loop devices (/dev/loop-control)"
        return None

    def __enter__(self) -> Self:
        self.path.mkdir(parents=True)
        with self._image.open("wb") as image:
            image.truncate(FLASH_BYTES)
        _run("mkfs.ext4", "-q", "-F", str(self._image))
        done = subprocess.run(
            ["mount", "-o", "loop", str(self._image), str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a loop filesystem here: {done.stderr.strip()}")
        self._mounted = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.thaw()
        if self._mounted:
            done = subprocess.run(["umount", str(self.path)], capture_output=True, check=False)
            if done.returncode != 0:  # still busy: detach it, the loop device goes with it
                _run("umount", "-l", str(self.path))
            self._mounted = False
        self._image.unlink(missing_ok=True)

    def freeze(self) -> None:
        _run("fsfreeze", "--freeze", str(self.path))
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen:
            _run("fsfreeze", "--unfreeze", str(self.path))
            self._frozen = False


def _run(*command: str) -> None:
    subprocess.run(command, capture_output=True, check=True)


def thread_states(pid: int) -> dict[int, str]:
    """{thread id: state letter} of a process, from /proc (R, S, D: waiting on I/O, T: stopped)."""
    states: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            stat = (task / "stat").read_text()
            states[int(task.name)] = stat[stat.rindex(")") + 2]
    return states


def main_thread_state(pid: int) -> str:
    """The state of the process's main thread: the one that runs the agent's event loop."""
    return thread_states(pid).get(pid, "")


@dataclass(frozen=True)
class Stall:
    """A way to stall the agent from outside: `begin` it, until the main thread shows
    `state`; `end` it."""

    begin: Callable[[], None]
    end: Callable[[], None]
    state: str


async def running_under_the_manager(
    rig: Rig, manager: ServiceManager, spool: Path | None = None
) -> None:
    """Start the agent under `manager` (its spool in `spool`, if given); return once it is
    ready, connected and pinging."""
    await rig.start_agent(env=manager.environment(), spool=spool)
    connected = f"connected to localhost:{rig.proxy.port}; "
    await wait_until(
        lambda: manager.first("READY") is not None,
        timeout_s=rig.spec.first_reading_s,
        what=f"READY=1 (got {manager.notices})",
    )
    await wait_until(
        lambda: any(s.startswith(connected) for s in manager.statuses()),
        timeout_s=15.0,
        what=f"STATUS={connected}... (got {manager.statuses()})",
    )
    await wait_until(
        lambda: len(manager.pings()) >= 3, timeout_s=15.0, what="three WATCHDOG=1 pings"
    )


async def stalled(rig: Rig, manager: ServiceManager, stall: Stall) -> list[Notice]:
    """Stall the agent for STALL_S once its loop thread is seen stalled, and end the stall
    whatever happens; return the pings that arrived meanwhile."""
    pid = rig.pid
    try:
        stall.begin()
        await wait_until(
            lambda: main_thread_state(pid) == stall.state,
            timeout_s=10.0,
            what=f"the agent's loop thread in state {stall.state} ({thread_states(pid)})",
        )
        manager.receive()  # whatever the agent sent before it stalled
        since = time.monotonic()
        print(f"stalled: thread states {thread_states(pid)}")
        await asyncio.sleep(STALL_S)
        manager.receive()  # anything still queued on the socket came during the stall
        return manager.pings(since)
    finally:
        stall.end()


async def resumed_and_stopped(rig: Rig, manager: ServiceManager) -> None:
    """After a stall: pings again, a clean stop with STOPPING=1, and nothing lost."""
    after = time.monotonic()
    await wait_until(
        lambda: len(manager.pings(after)) >= 2,
        timeout_s=15.0,
        what="WATCHDOG=1 pings after the stall",
    )
    run = await rig.stop_agent()
    assert run.returncode == 0, rig.agent_log()
    stopping = manager.first("STOPPING")
    assert stopping is not None, manager.notices
    assert stopping.fields["STOPPING"] == "1"
    assert run.summary is not None
    accepted = run.summary["accepted"]
    assert isinstance(accepted, int)
    observer = rig.observer
    await wait_until(
        lambda: observer.readings_total() >= accepted,
        timeout_s=15.0,
        what=f"all {accepted} accepted readings at the observer",
    )
    assert observer.readings_total() == accepted
    assert observer.failures == []
    assert "event loop was blocked for about" in rig.agent_log()


def ping_gaps(manager: ServiceManager, since: float, until: float) -> float:
    """The longest time between two pings that arrived in [since, until) (a figure)."""
    times = [n.at for n in manager.pings(since, until)]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def check_ready_and_status(manager: ServiceManager) -> None:
    ready = manager.first("READY")
    assert ready is not None
    assert ready.fields["READY"] == "1"
    assert STATUS_LINE.fullmatch(ready.fields.get("STATUS", "")), ready.fields
    assert all(STATUS_LINE.fullmatch(s) for s in manager.statuses()), manager.statuses()
    assert len(set(manager.statuses())) >= 2, manager.statuses()


@pytest.fixture(autouse=True)
def no_service_manager_of_our_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent inherits the test's environment: only the manager's socket may be in it
    (WATCHDOG_PID of the test's own service manager would disable the agent's watchdog)."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def test_the_watchdog_pings_stop_while_the_agent_is_stopped_and_status_follows_the_link(
    rig_spec: RigSpec, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("network")
            with ServiceManager() as manager:
                began = time.monotonic()
                await running_under_the_manager(rig, manager)
                rig.proxy.cut()
                await wait_until(
                    lambda: manager.statuses()[-1].startswith("connecting to "),
                    timeout_s=15.0,
                    what=f"STATUS=connecting to ... (got {manager.statuses()})",
                )
                rig.proxy.restore()
                await wait_until(
                    lambda: manager.statuses()[-1].startswith("connected to "),
                    timeout_s=15.0,
                    what=f"STATUS=connected to ... again (got {manager.statuses()})",
                )
                pid = rig.pid
                stall = Stall(
                    begin=lambda: os.kill(pid, signal.SIGSTOP),
                    end=lambda: os.kill(pid, signal.SIGCONT),
                    state="T",
                )
                before = time.monotonic()
                during = await stalled(rig, manager, stall)
                await resumed_and_stopped(rig, manager)

                assert during == []
                check_ready_and_status(manager)
                print(
                    f"longest gap between pings while running: "
                    f"{ping_gaps(manager, began, before):.2f} s (timeout {WATCHDOG_S:g} s)"
                )

    asyncio.run(scenario())


def test_the_watchdog_pings_stop_while_the_event_loop_waits_on_a_hung_flash(
    rig_spec: RigSpec, tmp_path: Path
) -> None:
    reason = FrozenFlash.why_not()
    if reason is not None:
        pytest.skip(reason)

    async def scenario() -> None:
        with FrozenFlash(tmp_path / "flash") as flash:
            async with Rig(rig_spec, tmp_path) as rig:
                rig.require("disk")
                with ServiceManager() as manager:
                    await running_under_the_manager(rig, manager, spool=flash.path)
                    stall = Stall(begin=flash.freeze, end=flash.thaw, state="D")
                    during = await stalled(rig, manager, stall)
                    await resumed_and_stopped(rig, manager)

                    assert during == []
                    check_ready_and_status(manager)

    asyncio.run(scenario())
