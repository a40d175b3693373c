"""The trial of a new release: the flow's last state, from the switch to commit or rollback.

After agent.ota.flow switched `current` to a new release the flow document says
`trial`. The new release is then on trial until one of these ends it:

- `begin` (the agent's OTA task, agent.ota.task, on start): when this release is the
  one on trial, sets the trial deadline on its first start (stored as wall time and
  as CLOCK_BOOTTIME, agent.ota.store) and returns it after;
- `commit` (the task, once a signed health message was acknowledged): `committed`
  becomes the release, the flow goes idle, a `--force`d refusal is lifted;
- `fail` (the task, when the deadline passed without that acknowledgement): rollback;
- `guard` (`citygate ota guard`, the unit's ExecStartPre, run from the *committed*
  release's code so a broken new release cannot skip it): counts the start and rolls
  back after more than `max_trial_starts` starts or a start past the deadline; when
  `current` is no longer the release on trial (switched back from outside) it records
  the rollback that already happened.

Rollback switches `current` back to `committed`, refuses the version (never chosen
again automatically) and writes the `rolled_back` history row. Each call is one
transaction of the state store (its short lock only), so a service start never waits
for a flow run, and a crash between the switch and the row leaves `trial` with
`current` already back: the next guard finishes the rollback. The fault point
"rollback/switched" (agent.ota.flow's test rig) fires between the two.

Trusts: the state store (agent.ota.store) and the release links (agent.ota.release);
the version the caller says it runs (the agent's own version, not a network value);
the wall clock only where the boot-time deadline cannot decide (after a reboot, or
no boot id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from agent.ota.release import Releases
from agent.ota.store import TRIAL, OtaError, StateStore, Tx, past_deadline, trial_deadline

__all__ = ["Trial", "TrialSettings"]

log = logging.getLogger(__name__)


class TrialSettings(Protocol):
    """What the trial reads from the `[ota]` config table (agent.config.OtaConfig)."""

    @property
    def trial_deadline_s(self) -> float: ...
    @property
    def max_trial_starts(self) -> int: ...


class Trial:
    """The trial over one gateway's state store and releases; `fault` is the test rig's
    fault injector (agent.ota.flow), called with the name of each fault point."""

    def __init__(
        self,
        store: StateStore,
        releases: Releases,
        settings: TrialSettings,
        *,
        wall: Callable[[], float],
        fault: Callable[[str], None],
    ) -> None:
        self.store = store
        self.releases = releases
        self.settings = settings
        self._wall = wall
        self._fault = fault

    def guard(self) -> str:
        """Before a service start (run from the committed release): count a trial start;
        roll back when there were too many or the deadline has passed."""
        with self.store.tx() as tx:
            flow = tx.flow
            if flow["state"] != TRIAL:
                return f"not in trial ({flow['state']})"
            version = str(flow["target"])
            current = self.releases.current()
            if current != version:
                return self._rolled_back(tx, version, f"current is {current}, not {version}")
            starts = int(flow.get("trial_starts", 0)) + 1
            limit = self.settings.max_trial_starts
            if starts > limit:
                return self._roll_back(tx, version, f"started {starts} times (limit {limit})")
            if past_deadline(flow, self._wall()):
                return self._roll_back(tx, version, "its trial deadline passed")
            tx.set_flow(trial_starts=starts)
        return f"trial of {version}: start {starts} of {limit}"

    def begin(self, own_version: str) -> float | None:
        """The agent started: when it is the release in trial, the trial deadline (unix s),
        set on the first start and kept after."""
        with self.store.tx() as tx:
            flow = tx.flow
            if flow["state"] != TRIAL or flow.get("target") != own_version:
                return None
            if flow.get("trial_deadline") is None:
                span = self.settings.trial_deadline_s
                tx.set_flow(**trial_deadline(tx.wall, span))
                tx.add("trial", own_version, "ok", f"deadline in {span:g} s")
            return float(tx.flow["trial_deadline"])

    def commit(self, own_version: str) -> None:
        """The release in trial got a signed health message acknowledged: keep it."""
        with self.store.tx() as tx:
            flow = tx.flow
            if flow["state"] != TRIAL or flow.get("target") != own_version:
                return
            self.releases.commit(own_version)
            tx.idle()
            tx.unrefuse(own_version)  # installed with --force and proved itself
            tx.add("committed", own_version, "ok", f"from {flow.get('from_version')}")

    def fail(self, own_version: str, reason: str) -> None:
        """The release in trial did not prove itself: switch back to the committed one."""
        with self.store.tx() as tx:
            flow = tx.flow
            if flow["state"] != TRIAL or flow.get("target") != own_version:
                return
            self._roll_back(tx, own_version, reason)

    def _roll_back(self, tx: Tx, version: str, reason: str) -> str:
        committed = self.releases.committed()
        if committed is None:
            raise OtaError(
                f"cannot roll back {version}: no committed release under {self.releases.root}"
            )
        self.releases.switch(committed)
        self._fault("rollback/switched")
        return self._rolled_back(tx, version, reason)

    def _rolled_back(self, tx: Tx, version: str, reason: str) -> str:
        back = self.releases.current()
        tx.idle()
        tx.refuse(version, f"rolled back: {reason}")
        tx.add("rolled_back", version, "rolled_back", f"{reason}; current is {back}")
        log.error("release %s rolled back: %s", version, reason)
        return f"rolled back {version} to {back}: {reason}"
