"""The OTA part of the running agent (docs/adr/0007-ota-updates.md).

`OtaTask` runs in the service's task group:

- on start, if this release is on trial, it arms the trial's deadline; the
  first signed health report the broker acknowledges commits the release; at
  the deadline the release switches back and the service restarts (exit 75);
- it checks the repository when an `ota/offer` hint arrives or every
  `ota.check_interval_s`; the flow itself (agent/ota/flow.py: download,
  verify, install, self-test, switch) runs in a worker thread, so the event
  loop, the sensors and the uplink go on meanwhile;
- when a flow (its own, or `citygate ota apply` on the command line) has
  switched to a new release, the service restarts into it (exit 75);
- every step in the OTA history that is not yet reported becomes a signed
  event on the events topic (so steps taken before a power cut, by the guard
  or by the command line are reported too).

Trusts: the flow; an offer is only a hint to look (its version is logged, never used).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: how often the task looks at the OTA state file (a flow of another process, new history)
POLL_S = 2.0
#: the exit status that asks systemd for a restart (RestartForceExitStatus=75)
EXIT_RESTART = 75


class Manager(Protocol):
    """What the task needs of agent.ota.flow.OtaManager."""

    def apply(self, repo: str | None) -> Any: ...
    def resume(self) -> Any: ...
    def trial_begin(self, own_version: str) -> float | None: ...
    def trial_commit(self, own_version: str) -> None: ...
    def trial_fail(self, own_version: str, reason: str) -> None: ...
    def stamp(self) -> object: ...
    def unreported(self) -> list[dict[str, Any]]: ...
    def mark_reported(self, ids: list[int]) -> None: ...
    def status(self) -> dict[str, Any]: ...


EventSink = Callable[..., None]
_NOT_DETAIL = frozenset({"id", "step", "version", "reported"})


class OtaTask:
    def __init__(
        self,
        manager: Manager,
        *,
        own_version: str,
        repo: str,
        check_interval_s: float,
        report_acked: asyncio.Event,
        event: EventSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._manager = manager
        self._own = own_version
        self._repo = repo
        self._interval_s = check_interval_s
        self._acked = report_acked
        self._event = event
        self._clock = clock
        self._offered = asyncio.Event()
        self._queued: set[int] = set()  # history rows handed to health, not yet acknowledged
        self._seen: object = None  # the state file's stamp when it was last read in full
        self.restart = asyncio.Event()  # the service must exit with EXIT_RESTART
        self.state = "idle"  # for health reports

    def offer(self, version: str) -> None:
        """An `ota/offer` hint: look at the repository soon (the version is only logged)."""
        if not self._repo:
            log.warning("update %s offered, but no ota.repo is configured: ignored", version)
            return
        log.info("update %s offered: checking the repository", version)
        self._offered.set()

    async def run(self) -> None:
        # first finish a flow a power cut interrupted: it may end in a switch to this
        # very release (killed between the switch and its record), which starts a trial
        await self._call(self._manager.resume)
        if self.restart.is_set():
            return
        deadline = await asyncio.to_thread(self._manager.trial_begin, self._own)
        if deadline is not None:
            self.state = "trial"
            if await self._trial(deadline):
                return
        next_check = self._clock() + self._interval_s if self._interval_s else None
        while not self.restart.is_set():
            if self._look():
                return
            due = next_check is not None and self._clock() >= next_check
            if self._offered.is_set() or due:
                self._offered.clear()
                if next_check is not None:
                    next_check = self._clock() + self._interval_s
                await self._call(self._manager.apply, self._repo)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._offered.wait()

    async def _trial(self, deadline: float) -> bool:
        """Until a health report is acked (commit: False) or the deadline (rollback: True).

        The time left is taken from the wall clock once, then counted on the monotonic
        clock: an NTP step at boot must not end the trial (the guard also keeps a
        boot-time deadline)."""
        ends = time.monotonic() + max(0.0, deadline - self._clock())
        log.warning(
            "release %s is on trial: it must have a signed health report acknowledged "
            "within %.0f s",
            self._own,
            ends - time.monotonic(),
        )
        self._acked.clear()
        while not self._acked.is_set():
            self._look()
            left = ends - time.monotonic()
            if left <= 0:
                reason = "no signed health report acknowledged before the trial deadline"
                log.error("release %s failed its trial: %s; switching back", self._own, reason)
                await asyncio.to_thread(self._manager.trial_fail, self._own, reason)
                self._look()
                self.restart.set()
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(POLL_S, left)):
                    await self._acked.wait()
        await asyncio.to_thread(self._manager.trial_commit, self._own)
        log.info("release %s passed its trial and is committed", self._own)
        self.state = "idle"
        self._look()
        return False

    async def _call(self, step: Callable[..., Any], *args: Any) -> None:
        """Run a flow step in a worker thread; a failure is logged, never fatal."""
        self.state = "updating"
        try:
            await asyncio.to_thread(step, *args)
        except Exception:  # the flow records its own failures; anything else is a bug
            log.exception("update flow failed")
        finally:
            self.state = "idle"
        self._look()

    def _look(self) -> bool:
        """Report new history rows and notice a switch made by another process; the
        state file is read only when it changed since the last look (a stat per poll).
        True when the service must restart."""
        stamp = self._manager.stamp()
        if stamp is not None and stamp == self._seen:
            return False
        if self._report():
            self._seen = stamp
        return self._switched_elsewhere()

    def _switched_elsewhere(self) -> bool:
        """A flow switched to another release: restart into it."""
        try:
            status = self._manager.status()
        except Exception:
            log.exception("cannot read the update state")
            return False
        if status.get("state") == "trial" and status.get("target") not in (None, self._own):
            log.warning("release %s is installed and switched to: restarting", status["target"])
            self.restart.set()
            return True
        return False

    def _report(self) -> bool:
        """Every history row not yet reported becomes a signed event; a row is marked
        reported only once the broker has acknowledged its event, so steps taken just
        before a restart are reported by the next run. False if the history was unreadable."""
        try:
            rows = self._manager.unreported()
        except Exception:
            log.exception("cannot read the update history")
            return False
        for row in rows:
            row_id = int(row["id"])
            if row_id in self._queued:
                continue
            detail = {
                k: v
                for k, v in row.items()
                if k not in _NOT_DETAIL and isinstance(v, str | int | float)
            }
            self._queued.add(row_id)
            self._event(
                f"ota_{row['step']}",
                str(row.get("version") or "agent"),
                on_sent=functools.partial(self._sent, row_id),
                **detail,
            )
        return True

    def _sent(self, row_id: int) -> None:
        try:
            self._manager.mark_reported([row_id])
        except Exception:  # it is reported again by the next run: a duplicate, not a loss
            log.exception("cannot mark update history row %d reported", row_id)
