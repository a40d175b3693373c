"""The agent's OTA task (agent/ota/task.py) against a manager that records its calls.

The manager's side (the persisted flow) has its own tests with real repositories
and releases (test_ota_flow.py); the whole thing runs end to end in
test_ota_e2e.py. Here: what triggers a check (offer, timer, nothing), the
trial (commit on an acknowledged health report, rollback at the deadline, the
deadline counted on the monotonic clock), restart after a switch made by
another process, and history rows marked reported only once their event is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from agent.ota import task as task_module
from agent.ota.task import OtaTask


class Recorder:
    """A manager (agent.ota.task.Manager) that records calls; `state` is what status says."""

    def __init__(self, *, deadline: float | None = None, target: str | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.deadline = deadline
        self.state = "trial" if deadline is not None else "idle"
        self.target = target
        self.rows: list[dict[str, Any]] = []
        self.reported: set[int] = set()
        self.resume_switches_to: str | None = None
        self.fixed_stamp: object = None
        self.reads = 0

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def apply(self, repo: str | None) -> None:
        self._note("apply", repo)

    def resume(self) -> None:
        self._note("resume")
        if self.resume_switches_to is not None:  # a flow killed just after its switch
            self.state, self.target = "trial", self.resume_switches_to
            self.deadline = 10_000.0

    def trial_begin(self, own_version: str) -> float | None:
        self._note("trial_begin", own_version)
        return self.deadline

    def trial_commit(self, own_version: str) -> None:
        self._note("trial_commit", own_version)
        self.state = "idle"

    def trial_fail(self, own_version: str, reason: str) -> None:
        self._note("trial_fail", own_version, reason)
        self.state = "idle"

    def stamp(self) -> object:
        return self.fixed_stamp  # None: the task reads the state at every look

    def unreported(self) -> list[dict[str, Any]]:
        self.reads += 1
        return [row for row in self.rows if row["id"] not in self.reported]

    def mark_reported(self, ids: list[int]) -> None:
        self.reported.update(ids)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "target": self.target}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Events:
    """The health event sink; `send()` acknowledges what was queued (calls on_sent)."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, str, dict[str, Any]]] = []
        self._pending: list[Callable[[], None]] = []

    def __call__(
        self, kind: str, subject: str, *, on_sent: Callable[[], None] | None = None, **detail: Any
    ) -> None:
        self.queued.append((kind, subject, detail))
        if on_sent is not None:
            self._pending.append(on_sent)

    def send(self) -> None:
        pending, self._pending = self._pending, []
        for done in pending:
            done()


def _task(
    manager: Recorder,
    events: Events,
    acked: asyncio.Event,
    *,
    repo: str = "/media/usb",
    interval_s: float = 0,
    clock: Callable[[], float] | None = None,
) -> OtaTask:
    return OtaTask(
        manager,
        own_version="1.0",
        repo=repo,
        check_interval_s=interval_s,
        report_acked=acked,
        event=events,
        **({"clock": clock} if clock else {}),
    )


async def _run_for(task: OtaTask, seconds: float) -> None:
    runner = asyncio.create_task(task.run())
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(runner)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_module, "POLL_S", 0.02)


def test_an_offer_starts_a_check_and_nothing_else_does() -> None:
    manager, events = Recorder(), Events()

    async def scenario() -> None:
        acked = asyncio.Event()
        task = _task(manager, events, acked)
        runner = asyncio.create_task(task.run())
        await asyncio.sleep(0.2)
        assert manager.names() == ["resume", "trial_begin"]
        task.offer("2.0")
        await asyncio.sleep(0.2)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    asyncio.run(scenario())
    assert manager.names() == ["resume", "trial_begin", "apply"]
    assert manager.calls[-1] == ("apply", ("/media/usb",))


def test_an_offer_without_a_repository_is_ignored() -> None:
    manager, events = Recorder(), Events()

    async def scenario() -> None:
        task = _task(manager, events, asyncio.Event(), repo="")
        task.offer("2.0")
        await _run_for(task, 0.2)

    asyncio.run(scenario())
    assert "apply" not in manager.names()


def test_the_timer_checks_every_interval() -> None:
    manager, events = Recorder(), Events()
    now = [1000.0]

    async def scenario() -> None:
        task = _task(manager, events, asyncio.Event(), interval_s=3600, clock=lambda: now[0])
        runner = asyncio.create_task(task.run())
        await asyncio.sleep(0.1)
        assert "apply" not in manager.names()
        now[0] += 3600
        await asyncio.sleep(0.1)
        assert manager.names().count("apply") == 1
        now[0] += 1800
        await asyncio.sleep(0.1)
        assert manager.names().count("apply") == 1
        now[0] += 1800
        await asyncio.sleep(0.1)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    asyncio.run(scenario())
    assert manager.names().count("apply") == 2


def test_an_acknowledged_health_report_commits_the_release_on_trial() -> None:
    manager, events = Recorder(deadline=10_000.0, target="1.0"), Events()

    async def scenario() -> OtaTask:
        acked = asyncio.Event()
        task = _task(manager, events, acked, clock=lambda: 9_000.0)
        runner = asyncio.create_task(task.run())
        await asyncio.sleep(0.1)
        assert task.state == "trial"
        assert "trial_commit" not in manager.names()
        acked.set()
        await asyncio.sleep(0.1)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return task

    task = asyncio.run(scenario())
    assert manager.names()[:3] == ["resume", "trial_begin", "trial_commit"]
    assert not task.restart.is_set()
    assert task.state == "idle"


def test_no_acknowledgement_by_the_deadline_rolls_back_and_restarts() -> None:
    manager, events = Recorder(deadline=1000.3, target="1.0"), Events()

    async def scenario() -> OtaTask:
        task = _task(manager, events, asyncio.Event(), clock=lambda: 1000.0)
        async with asyncio.timeout(5):
            await task.run()  # returns after the rollback
        return task

    task = asyncio.run(scenario())
    assert manager.names() == ["resume", "trial_begin", "trial_fail"]
    assert "deadline" in manager.calls[-1][1][1]
    assert task.restart.is_set()


def test_the_deadline_is_counted_on_the_monotonic_clock() -> None:
    """A wall clock stepped forward (NTP at boot) must not end the trial early."""
    manager, events = Recorder(deadline=1300.0, target="1.0"), Events()
    wall = [1000.0]

    async def scenario() -> None:
        task = _task(manager, events, asyncio.Event(), clock=lambda: wall[0])
        runner = asyncio.create_task(task.run())
        await asyncio.sleep(0.05)
        wall[0] += 86_400  # a day's step
        await asyncio.sleep(0.3)
        assert not task.restart.is_set()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    asyncio.run(scenario())
    assert "trial_fail" not in manager.names()


def test_a_switch_made_by_another_process_restarts_the_service() -> None:
    manager, events = Recorder(), Events()

    async def scenario() -> OtaTask:
        task = _task(manager, events, asyncio.Event())
        runner = asyncio.create_task(task.run())
        await asyncio.sleep(0.1)
        assert not task.restart.is_set()
        manager.state, manager.target = "trial", "2.0"  # `citygate ota apply` switched
        async with asyncio.timeout(5):
            await runner
        return task

    task = asyncio.run(scenario())
    assert task.restart.is_set()


def test_history_rows_are_reported_once_and_marked_only_when_sent() -> None:
    manager, events = Recorder(), Events()
    manager.rows = [
        {"id": 1, "step": "verified", "version": "2.0", "reported": False, "detail": "ok"},
        {"id": 2, "step": "switched", "version": "2.0", "reported": False, "time": 5.0},
    ]

    async def scenario() -> None:
        task = _task(manager, events, asyncio.Event())
        await _run_for(task, 0.2)  # many polls: each row queued once
        assert manager.reported == set()  # nothing acknowledged yet
        events.send()

    asyncio.run(scenario())
    assert [(k, s) for k, s, _ in events.queued] == [
        ("ota_verified", "2.0"),
        ("ota_switched", "2.0"),
    ]
    assert events.queued[0][2] == {"detail": "ok"}
    assert manager.reported == {1, 2}


def test_a_flow_resumed_into_a_switch_to_this_release_starts_its_trial() -> None:
    """Killed between the switch and its record: the new release finishes the switch on
    start (resume) and must then be on trial, not idle for ever."""
    manager, events = Recorder(), Events()
    manager.resume_switches_to = "1.0"

    async def scenario() -> OtaTask:
        acked = asyncio.Event()
        task = _task(manager, events, acked, clock=lambda: 9_000.0)
        runner = asyncio.create_task(task.run())
        await asyncio.sleep(0.1)
        assert task.state == "trial"
        acked.set()
        await asyncio.sleep(0.1)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return task

    task = asyncio.run(scenario())
    assert manager.names()[:3] == ["resume", "trial_begin", "trial_commit"]
    assert not task.restart.is_set()


def test_the_state_is_read_only_when_its_stamp_changes() -> None:
    manager, events = Recorder(), Events()
    manager.fixed_stamp = (1, 1)

    async def scenario() -> None:
        await _run_for(_task(manager, events, asyncio.Event()), 0.3)  # about 15 polls

    asyncio.run(scenario())
    assert manager.reads == 1
