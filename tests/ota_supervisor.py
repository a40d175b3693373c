"""What systemd does for the citygate unit, for tests that cannot boot systemd as PID 1.

images/systemd/citygate.service runs, for every start:

    ExecStartPre=<root>/committed/bin/citygate ota guard --config C
    ExecStart=<root>/current/bin/citygate run --config C
    Restart=on-failure, RestartForceExitStatus=75, StartLimitBurst=5

`Supervisor` does the same with real subprocesses: the guard from the committed
release (the last one that passed its trial), then the current release, and
again when that exits with a failure or 75 ("restart me"), until `stop()`
(SIGTERM, as `systemctl stop`). Like systemd it resolves the symlinks afresh
at every start, so a switch or a rollback takes effect at the next start.
It records every start: which release ran, when, and how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESTART_S = 0.2  # RestartSec, shortened for tests
START_LIMIT_BURST = 5  # systemd gives up after this many failed starts in a row


@dataclass
class Start:
    release: str  # what <root>/current resolved to
    started: float  # time.time()
    started_mono: float  # time.monotonic(), to compare with observed arrivals
    guard_exit: int | None = None
    exit_code: int | None = None
    ended: float | None = None
    summary: dict[str, Any] | None = None  # the run's last-run.json, if it wrote one


@dataclass
class Supervisor:
    root: Path
    config: Path
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    summary: Path | None = None  # the agent's last-run.json, read after every exit
    first_env: Mapping[str, str] = field(default_factory=dict)  # for the first agent run only
    on_exit: Callable[[Start], None] | None = None  # right after an agent run ended
    starts: list[Start] = field(default_factory=list)
    gave_up: bool = False
    _proc: asyncio.subprocess.Process | None = None
    _stopping: bool = False
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="supervisor")

    @property
    def running(self) -> str | None:
        """The release of the process running now, if one is."""
        if self._proc is None or self._proc.returncode is not None or not self.starts:
            return None
        return self.starts[-1].release

    async def stop(self, grace_s: float = 20.0) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def kill(self) -> None:
        """A power cut of the running agent (it is started again, as after a reboot)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)

    def _summary(self, since: float) -> dict[str, Any] | None:
        if self.summary is None:
            return None
        try:
            if self.summary.stat().st_mtime < since:
                return None  # an earlier run's
            loaded: dict[str, Any] = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return loaded

    async def _run(
        self, *args: str | Path, extra: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        with self.log.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *(str(a) for a in args),
                stdout=out,
                stderr=out,
                env={**os.environ, **self.env, **(extra or {})},
                start_new_session=True,
            )

    async def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            guard_exit = None
            committed = self.root / "committed" / "bin" / "citygate"
            if committed.exists():  # the unit's ExecStartPre (absent before the first OTA)
                guard = await self._run(committed, "ota", "guard", "--config", self.config)
                guard_exit = await guard.wait()
            release = os.readlink(self.root / "current")
            start = Start(Path(release).name, time.time(), time.monotonic(), guard_exit)
            self.starts.append(start)
            self._proc = await self._run(
                self.root / "current" / "bin" / "citygate",
                "run",
                "--config",
                self.config,
                extra=self.first_env if len(self.starts) == 1 else None,
            )
            start.exit_code = await self._proc.wait()
            start.ended = time.time()
            start.summary = self._summary(start.started)
            if self.on_exit is not None:
                self.on_exit(start)
            if self._stopping or start.exit_code == 0:
                return
            failures = 0 if start.exit_code == 75 else failures + 1
            if failures >= START_LIMIT_BURST:
                self.gave_up = True
                return
            await asyncio.sleep(RESTART_S)
