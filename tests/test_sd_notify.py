"""sd_notify from the agent: datagrams on $NOTIFY_SOCKET, watchdog pings from the event loop.

A real AF_UNIX datagram socket stands in for systemd's notification socket
(both a path and an abstract name); what arrives on it is what systemd reads.
The last test runs the real agent against it; the agent under a real systemd
is tested in tests/test_deb.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.systemd import Notifier, keep_alive
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import write_config

ROOT = Path(__file__).resolve().parent.parent


class Listener:
    """The service manager's end: a bound datagram socket and what arrived on it."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def received(self) -> list[dict[str, str]]:
        """Every datagram waiting now, parsed into its KEY=value fields; never blocks."""
        messages: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages
            lines = data.decode().splitlines()
            messages.append(dict(line.split("=", 1) for line in lines))

    def environment(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    try:
        yield Listener(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"citygate-test-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + name)
    try:
        yield Listener(sock, "@" + name)
    finally:
        sock.close()


def test_ready_with_status_reaches_a_socket_path(listener: Listener) -> None:
    notifier = Notifier.from_environment(listener.environment())
    notifier.ready("connected to mqtt.example.city:8883")
    notifier.close()
    assert listener.received() == [{"READY": "1", "STATUS": "connected to mqtt.example.city:8883"}]


def test_an_abstract_socket_name_is_used_as_such(abstract_listener: Listener) -> None:
    notifier = Notifier.from_environment(abstract_listener.environment())
    notifier.status("spooling")
    notifier.stopping()
    notifier.close()
    assert abstract_listener.received() == [{"STATUS": "spooling"}, {"STOPPING": "1"}]


def test_without_notify_socket_every_call_does_nothing() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.send(STATUS="nobody listens") is True


def test_a_notify_socket_that_is_neither_path_nor_abstract_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "relative/socket"})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET" in caplog.text


def test_a_newline_in_a_status_cannot_forge_another_field(listener: Listener) -> None:
    notifier = Notifier.from_environment(listener.environment())
    notifier.status("sensor said: hello\nREADY=1")
    notifier.close()
    assert listener.received() == [{"STATUS": "sensor said: hello READY=1"}]


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_is_pinged_at_half_its_timeout_and_only_by_its_owner(
    listener: Listener, extra: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environment(listener.environment(**extra), pid=4242)
    assert notifier.watchdog_interval_s == interval
    notifier.watchdog()
    notifier.close()
    assert listener.received() == ([{"WATCHDOG": "1"}] if interval else [])


def test_a_vanished_socket_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING):
        assert notifier.send(STATUS="a") is False
        assert notifier.send(STATUS="b") is False
    notifier.close()
    assert [r.getMessage() for r in caplog.records if "cannot notify" in r.getMessage()] == [
        "cannot notify systemd (ENOENT): No such file or directory"
    ]


def test_keep_alive_pings_from_the_loop_and_sends_status_only_when_it_changes(
    listener: Listener,
) -> None:
    notifier = Notifier.from_environment(listener.environment(WATCHDOG_USEC="20000"))  # 10 ms
    states = iter(["starting", "starting", "connected", "connected"])
    got: list[dict[str, str]] = []

    async def scenario() -> None:
        task = asyncio.create_task(keep_alive(notifier, lambda: next(states, "connected")))
        while len(got) < 6:
            got.extend(listener.received())
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    notifier.close()
    assert all(message["WATCHDOG"] == "1" for message in got)
    assert [m["STATUS"] for m in got if "STATUS" in m] == ["starting", "connected"]
    assert got[0] == {"WATCHDOG": "1", "STATUS": "starting"}


def test_a_blocked_event_loop_sends_no_pings_so_systemd_catches_it(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environment(listener.environment(WATCHDOG_USEC="20000"))  # 10 ms

    async def scenario() -> list[dict[str, str]]:
        task = asyncio.create_task(keep_alive(notifier))
        await asyncio.sleep(0.05)
        listener.received()  # what came while the loop ran
        time.sleep(0.2)  # noqa: ASYNC251 -- the point: a blocking call, twenty ping periods
        during = listener.received()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return during

    with caplog.at_level(logging.WARNING):
        during = asyncio.run(scenario())
    notifier.close()
    assert during == []
    assert "event loop was blocked" in caplog.text


def test_keep_alive_returns_at_once_when_not_under_systemd() -> None:
    async def scenario() -> None:
        async with asyncio.timeout(5):
            await keep_alive(Notifier(None), lambda: "unused")

    asyncio.run(scenario())


def test_a_failing_status_callback_does_not_stop_the_pings(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environment(listener.environment(WATCHDOG_USEC="20000"))
    seen: list[dict[str, str]] = []

    def broken() -> str:
        raise RuntimeError("spool closed")

    async def scenario() -> None:
        task = asyncio.create_task(keep_alive(notifier, broken))
        while len(seen) < 3:
            seen.extend(listener.received())
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    notifier.close()
    assert seen[:3] == [{"WATCHDOG": "1"}] * 3
    assert "status for systemd failed" in caplog.text


@pytest.mark.integration
def test_the_agent_reports_ready_status_watchdog_and_stopping(
    listener: Listener, lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    """The real agent under a stand-in for systemd: what `Type=notify` and the watchdog see."""
    seen: list[dict[str, str]] = []

    def saw(predicate: Callable[[dict[str, str]], bool]) -> bool:
        seen.extend(listener.received())
        return any(predicate(message) for message in seen)

    async def until(predicate: Callable[[dict[str, str]], bool], what: str) -> None:
        try:
            async with asyncio.timeout(30):
                while not saw(predicate):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"no {what} from the agent; got {seen}") from None

    async def scenario() -> int:
        with Pms5003Emulator(period_s=0.2, seed=2, wait_for_host=True) as sensor:
            config = write_config(tmp_path, lab, broker.port, {"air_1": sensor.port})
            env = {**os.environ, **listener.environment(WATCHDOG_USEC="1000000")}
            env.pop("WATCHDOG_PID", None)
            with (tmp_path / "agent.log").open("wb") as log:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agent.cli", "run", "--config", str(config),
                    stdout=log, stderr=log, env=env, cwd=ROOT,
                )  # fmt: skip
            try:
                await until(lambda m: m.get("READY") == "1", "READY=1")
                connected = f"connected to localhost:{broker.port}; "
                await until(lambda m: m.get("STATUS", "").startswith(connected), "STATUS")
                await until(lambda _: sum("WATCHDOG" in m for m in seen) >= 3, "WATCHDOG=1")
                agent.send_signal(signal.SIGTERM)
                await until(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
                async with asyncio.timeout(30):
                    return await agent.wait()
            finally:
                if agent.returncode is None:
                    agent.kill()
                    await agent.wait()

    code = asyncio.run(scenario())
    assert code == 0, (tmp_path / "agent.log").read_text()
    ready = next(m for m in seen if m.get("READY") == "1")
    assert re.fullmatch(r"(connected|connecting) to localhost:\d+; .* spooled", ready["STATUS"])
    first_ping = next(i for i, m in enumerate(seen) if "WATCHDOG" in m)
    assert seen.index(ready) <= first_ping + 1  # ready as soon as the loop runs
