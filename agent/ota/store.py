"""The OTA flow's persisted state and its locks, under state_dir/ota/.

Files:

- `state.json`: TinyDB's layout (table -> {doc id: document}) with three tables:
  "ota" (one document: where the flow is, see agent.ota.flow), "history" (one row
  per step taken, with the `reported` flag the agent sets once the row went out as
  an event; at most HISTORY_MAX rows, the oldest reported ones go first) and
  "refused" (versions never chosen again automatically, with the reason).
- `state.lock`: held (fcntl.flock) for one read-modify-write of the whole file
  (`StateStore.tx`), never around network or install work: the guard and the trial
  calls take only this one, so a service start never waits for a download.
- `flow.lock`: held for a whole flow run (`StateStore.run_lock`); a second trigger
  waits for it, bounded, and then reads the first one's result.

Crash safety: every change is written by AtomicJSONStorage (temp file, fsync,
rename, fsync of the directory), so a SIGKILL or a power cut leaves the old file or
the new one, never a mix. flock locks belong to an open file: the kernel drops them
when their process dies, so a crash never leaves a stale lock behind.

Trial deadlines are stored twice: as wall time and as CLOCK_BOOTTIME with the boot
id. Within the boot that set it the boottime one decides (an NTP step at boot must
neither end nor stretch a trial); after a reboot boottime restarts, so the wall one.

Trusts: only its own file, which only this module writes (the agent, the CLI and
the guard run as the one user that owns the state dir; agent.ota.cli refuses root
over another user's state dir). A file that does not parse is set aside by
AtomicJSONStorage and reads as empty: the flow is idle, history and refusals lost,
which is safe (a refused version may be offered again and must pass its self-test and
trial again). Nothing from the network is stored here but version strings TUF
verified and error text.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from agent.clock import boottime
from agent.state import AtomicJSONStorage

# where the flow is: the "state" field of the flow document
IDLE: Final = "idle"
CHECKING: Final = "checking"
DOWNLOADING: Final = "downloading"
INSTALLING: Final = "installing"
SELFTEST: Final = "selftest"
SWITCHING: Final = "switching"
TRIAL: Final = "trial"

#: history rows kept; the oldest reported rows go first (flash wear and file size)
HISTORY_MAX: Final = 200
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class OtaError(Exception):
    """The flow cannot run: busy, no repository, nothing to roll back to."""


def boot_id() -> str:
    """This boot's id ("" where the kernel does not say: then only wall time is used)."""
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def trial_deadline(wall_now: float, span_s: float) -> dict[str, Any]:
    """The flow fields of a trial deadline `span_s` from now (see the module docstring)."""
    return {
        "trial_deadline": wall_now + span_s,
        "trial_deadline_boot": boottime() + span_s,
        "trial_boot_id": boot_id(),
    }


def past_deadline(flow: dict[str, Any], wall_now: float) -> bool:
    """Whether the trial deadline of the flow document `flow` has passed (none set: no)."""
    if flow.get("trial_deadline") is None:
        return False
    if flow.get("trial_boot_id") == boot_id() and boot_id():
        return boottime() > float(flow["trial_deadline_boot"])
    return wall_now > float(flow["trial_deadline"])


@contextlib.contextmanager
def _flock(path: Path, wait_s: float | None) -> Iterator[None]:
    """Hold an exclusive flock on `path`; wait at most `wait_s` (None: as long as it takes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise OtaError(
                            f"another OTA run holds {path} after {wait_s:g} s of waiting; "
                            "see `citygate ota status` and try again later"
                        ) from None
                    time.sleep(0.1)
        yield
    finally:
        os.close(fd)


class Tx:
    """The whole state file being changed; `wall` is the wall time the change began."""

    def __init__(self, data: dict[str, dict[str, Any]], wall: float) -> None:
        self.data = data
        self.wall = wall
        self.dirty = False

    @property
    def flow(self) -> dict[str, Any]:
        """The flow document (a copy: change it with set_flow or idle)."""
        doc: dict[str, Any] = self.data.get("ota", {}).get("1", {})
        return {"state": IDLE} | doc

    def set_flow(self, **changes: Any) -> None:
        flow = self.flow | changes
        self.data["ota"] = {"1": flow}
        self.dirty = True

    def idle(self) -> None:
        """Back to idle: the flow's per-target fields cleared."""
        self.data["ota"] = {"1": {"state": IDLE}}
        self.dirty = True

    def add(self, event: str, version: str | None, outcome: str, detail: str = "") -> None:
        """A history row (the event `ota_<event>` once reported); trims reported rows."""
        rows = self.data.setdefault("history", {})
        new_id = max((int(k) for k in rows), default=0) + 1
        rows[str(new_id)] = {
            "time": self.wall,
            "step": event,
            "version": version,
            "outcome": outcome,
            "detail": detail[-500:],
            "reported": False,
        }
        for key in sorted(rows, key=int):
            if len(rows) <= HISTORY_MAX:
                break
            if rows[key]["reported"]:
                del rows[key]
        self.dirty = True

    def history(self) -> list[dict[str, Any]]:
        """Every history row, oldest first, each with its `id`."""
        rows = self.data.get("history", {})
        return [{"id": int(k), **rows[k]} for k in sorted(rows, key=int)]

    def mark_reported(self, ids: list[int]) -> None:
        rows = self.data.get("history", {})
        for doc_id in ids:
            row = rows.get(str(doc_id))
            if row is not None and not row["reported"]:
                row["reported"] = True
                self.dirty = True

    def refused(self) -> set[str]:
        return {str(doc["version"]) for doc in self.data.get("refused", {}).values()}

    def unrefuse(self, version: str) -> None:
        docs = self.data.get("refused", {})
        for key in [k for k, doc in docs.items() if doc["version"] == version]:
            del docs[key]
            self.dirty = True

    def refuse(self, version: str, reason: str) -> None:
        if version in self.refused():
            return
        docs = self.data.setdefault("refused", {})
        new_id = max((int(k) for k in docs), default=0) + 1
        docs[str(new_id)] = {"version": version, "reason": reason[-300:], "time": self.wall}
        self.dirty = True


class StateStore:
    """The files under `directory` (state_dir/ota); `wall` stamps history rows."""

    def __init__(self, directory: Path, wall: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self._wall = wall

    @contextlib.contextmanager
    def tx(self) -> Iterator[Tx]:
        """One read-modify-write of the state file under the short state lock; written
        only when something changed and the block did not raise."""
        with _flock(self.dir / "state.lock", None):
            storage = AtomicJSONStorage(self.dir / "state.json")
            tx = Tx(storage.read() or {}, self._wall())
            yield tx
            if tx.dirty:
                storage.write(tx.data)

    def stamp(self) -> tuple[int, int] | None:
        """The state file's identity and change time (a stat, not a read): it differs after
        every write (each write renames a new file into place); None while there is none."""
        try:
            info = (self.dir / "state.json").stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns

    def run_lock(self, wait_s: float) -> contextlib.AbstractContextManager[None]:
        """The lock held for a whole flow run; OtaError after `wait_s` of waiting."""
        return _flock(self.dir / "flow.lock", wait_s)

    def flow(self) -> dict[str, Any]:
        with self.tx() as tx:
            return tx.flow

    def history(self) -> list[dict[str, Any]]:
        with self.tx() as tx:
            return tx.history()
