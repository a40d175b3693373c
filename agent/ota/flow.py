"""The OTA flow: a persisted state machine from "check" to "committed" (or rolled back).

One document (table "ota" of state_dir/ota/state.json) says where the flow is:
idle | checking | downloading | installing | selftest | switching | trial, with the
target version, the version it updates from, the repository and the attempt
number. Every step is written (atomically, fsynced) before its work starts and
every step's work is idempotent, so a SIGKILL or power cut anywhere resumes:

- checking .. selftest resume from checking (the download resumes its partial
  file, a complete release is reused, a half-built one rebuilt); after
  ATTEMPTS_MAX attempts at one target the flow gives up (ota_failed);
- switching resumes by making `current` the target (idempotent), then trial;
- trial is finished by the running release (`trial_commit` / `trial_fail`) or by
  the guard, which runs before every service start from the *committed*
  release's code: more than `max_trial_starts` starts, or a start past the
  deadline, switches `current` back to `committed` (agent.ota.trial).

A version that failed its self-test or was rolled back is refused: never chosen
again automatically (`apply(force=True)` may). Every step taken is a history row
(`step`: offered, verified, installed, selftest_failed, switched, trial, committed,
rolled_back, failed, rejected), published by the agent as the event `ota_<step>`.
The agent, the CLI and the guard share these files and their locks (agent.ota.store);
a whole run holds the flow lock, so a second trigger waits (bounded) and then sees
the first one's result. The steps' work on disk (repository, download, install, clean
up) is agent.ota.workdir; what a run reads and answers (OtaSettings, Outcome) is
agent.ota.terms, re-exported here with clock_trusted_for.

Trusts: TUF (agent.ota.trust) for what to install; agent.ota.bundle for the bundle's
members; the release's own `citygate selftest` for whether it runs; its own state
(agent.ota.store). The wall clock only when `clock_trusted()` says so (agent.clock's
rule): TUF expiry checks against a wrong clock are meaningless, so no check runs before.

Test rig: `CITYGATE_OTA_KILL_AT=<point>` makes the process SIGKILL *itself* right
after the point named (a step name: just after that step was persisted;
"<step>/done": just after its work, before the next step is persisted;
"rollback/switched": after a rollback switched `current` back). A fault injector
for the crash tests; it never touches another process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from packaging.version import InvalidVersion, Version

from agent import version as agent_version
from agent.ota import workdir
from agent.ota.bundle import BundleError, platform_tag, python_tag
from agent.ota.fetch import FetchError
from agent.ota.release import ReleaseError, Releases
from agent.ota.store import (
    CHECKING,
    DOWNLOADING,
    IDLE,
    INSTALLING,
    SELFTEST,
    SWITCHING,
    TRIAL,
    OtaError,
    StateStore,
)
from agent.ota.terms import (
    FAILED,
    IN_TRIAL,
    REJECTED,
    RETRY,
    SELFTEST_FAILED,
    SWITCHED,
    UP_TO_DATE,
    WAITING_CLOCK,
    OtaSettings,
    Outcome,
    clock_trusted_for,
)
from agent.ota.trial import Trial
from agent.ota.trust import Candidate, TrustError, UpdateRepository

if TYPE_CHECKING:
    from agent.config import Config

__all__ = [
    "ATTEMPTS_MAX",
    "KILL_ENV",
    "WAIT_S",
    "OtaError",
    "OtaManager",
    "OtaSettings",
    "Outcome",
    "clock_trusted_for",
    "manager_for",
]

log = logging.getLogger(__name__)

#: attempts at one target (a failed step or a crash counts one) before the flow gives up
ATTEMPTS_MAX: Final = 3
#: how long a trigger waits for another run by default before reporting "busy"
WAIT_S: Final = 3600.0
KILL_ENV: Final = "CITYGATE_OTA_KILL_AT"


def _fault(point: str) -> None:
    """The test rig's fault injector (see the module docstring): kills this process only."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class OtaManager:
    """The flow for one gateway: its state dir, its `[ota]` settings and its release root."""

    def __init__(
        self,
        state_dir: Path,
        settings: OtaSettings,
        *,
        clock_trusted: Callable[[], bool],
        selftest_config: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.dir = state_dir / "ota"
        self.store = StateStore(self.dir, wall)
        self.settings = settings
        self.releases = Releases(settings.root)
        self._clock_trusted = clock_trusted
        self._selftest_config = selftest_config
        self._client_cert = client_cert
        self._client_key = client_key
        self._trial = Trial(self.store, self.releases, settings, wall=wall, fault=_fault)

    # -- state -------------------------------------------------------------------------

    def _persist(self, step: str, **changes: Any) -> None:
        with self.store.tx() as tx:
            tx.set_flow(state=step, **changes)
        _fault(step)

    def status(self) -> dict[str, Any]:
        """The flow document, the releases and the refused versions."""
        with self.store.tx() as tx:
            flow, refused = tx.flow, sorted(tx.refused())
        return {
            **flow,
            "installed": self._installed(),
            "current": self.releases.current(),
            "committed": self.releases.committed(),
            "releases": self.releases.installed(),
            "refused": refused,
        }

    def history(self) -> list[dict[str, Any]]:
        """Every history row, oldest first, each with its `id`."""
        return self.store.history()

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever the state file is written (by any process); see StateStore."""
        return self.store.stamp()

    def unreported(self) -> list[dict[str, Any]]:
        """History rows not yet published on the events topic."""
        return [row for row in self.history() if not row["reported"]]

    def mark_reported(self, ids: list[int]) -> None:
        """The history rows `ids` went out on the events topic."""
        with self.store.tx() as tx:
            tx.mark_reported(ids)

    def _installed(self) -> str:
        return self.releases.current() or agent_version()

    # -- the run -----------------------------------------------------------------------

    def apply(self, repo: str | None, *, force: bool = False, wait_s: float = WAIT_S) -> Outcome:
        """Run (or continue) the flow up to the switch; wait up to `wait_s` for another run."""
        with self.store.run_lock(wait_s):
            return self._run(repo, force)

    def resume(self, *, wait_s: float = WAIT_S) -> Outcome | None:
        """Continue an interrupted flow (agent start); None when there is none."""
        if self.store.flow()["state"] in (IDLE, TRIAL):
            return None
        with self.store.run_lock(wait_s):
            if self.store.flow()["state"] in (IDLE, TRIAL):
                return None
            return self._run(None, False)

    def _run(self, repo: str | None, force: bool) -> Outcome:
        flow = self.store.flow()
        step = flow["state"]
        if step == TRIAL:
            target = flow["target"]
            return Outcome(
                IN_TRIAL,
                target,
                f"{target} is installed and in trial (started {flow.get('trial_starts', 0)} "
                "time(s)); it commits or rolls back on its own",
            )
        if step == SWITCHING:
            return self._finish_switch(flow["target"])
        repo = repo or flow.get("repo") or self.settings.repo
        if not repo:
            raise OtaError("no update repository: give --repo DIR|URL or set ota.repo")
        if not self._clock_trusted():
            return Outcome(
                WAITING_CLOCK,
                None,
                "waiting for a trusted clock: TUF metadata expiry cannot be checked before "
                "the wall clock is set (NTP)",
            )
        return self._attempt(repo, flow, force)

    def _attempt(self, repo: str, flow: dict[str, Any], force: bool) -> Outcome:
        resumed = flow["state"] != IDLE
        attempt = int(flow.get("attempt", 0)) + 1 if resumed else 1
        force = force or (resumed and bool(flow.get("force")))
        if attempt > ATTEMPTS_MAX:
            return self._give_up(flow.get("target"), str(flow.get("error") or "interrupted"))
        self._persist(CHECKING, repo=repo, attempt=attempt, force=force, error=None)
        try:
            trust = workdir.open_repository(
                self.dir,
                self.settings,
                repo,
                client_cert=self._client_cert,
                client_key=self._client_key,
            )
            trust.refresh()
            installed = self._installed()
            with self.store.tx() as tx:
                refused = frozenset() if force else frozenset(tx.refused())
            cand, why = trust.choose(
                installed,
                platform=platform_tag(),
                python=python_tag(),
                hardware=self.settings.hardware,
                channel=self.settings.channel,
                refused=refused,
            )
        except TrustError as exc:
            if exc.retryable:
                return self._retry(f"checking {repo}: {exc}")
            return self._reject(flow.get("target"), f"update metadata: {exc}", refuse=False)
        except (FetchError, OSError) as exc:
            return self._retry(f"checking {repo}: {exc}")
        if cand is None:
            with self.store.tx() as tx:
                tx.idle()
            workdir.cleanup(self.dir)
            detail = "; ".join(why) if why else "no newer release"
            return Outcome(UP_TO_DATE, installed, f"{installed} is up to date ({detail})")
        if cand.version != flow.get("target"):
            attempt = 1
        _fault(CHECKING + "/done")
        return self._deliver(trust, cand, installed, attempt)

    def _deliver(
        self, trust: UpdateRepository, cand: Candidate, installed: str, attempt: int
    ) -> Outcome:
        version = cand.version
        if cand.length > self.settings.max_bundle_bytes:
            return self._reject(
                version,
                f"bundle {cand.name} is {cand.length} bytes, more than ota.max_bundle_bytes "
                f"({self.settings.max_bundle_bytes})",
                refuse=True,
            )
        with self.store.tx() as tx:
            tx.set_flow(state=DOWNLOADING, target=version, from_version=installed, attempt=attempt)
            tx.add("offered", version, "ok", f"from {installed}, attempt {attempt}")
        _fault(DOWNLOADING)
        try:
            bundle = workdir.download(
                self.dir, trust, cand, timeout_s=self.settings.download_timeout_s
            )
        except TrustError as exc:
            if exc.retryable:
                return self._retry(str(exc))
            return self._reject(version, str(exc), refuse=False)
        except (FetchError, OSError) as exc:
            return self._retry(f"downloading {cand.name}: {exc}")
        _fault(DOWNLOADING + "/done")
        with self.store.tx() as tx:
            tx.set_flow(state=INSTALLING)
            tx.add("verified", version, "ok", f"{cand.length} bytes")
        _fault(INSTALLING)
        return self._install_and_test(bundle, cand)

    def _install_and_test(self, bundle: Path, cand: Candidate) -> Outcome:
        version = cand.version
        try:
            workdir.install(self.dir, self.releases, bundle, version)
        except BundleError as exc:
            return self._reject(version, f"bundle {cand.name}: {exc}", refuse=True)
        except (ReleaseError, OSError) as exc:
            return self._retry(f"installing {version}: {exc}")
        _fault(INSTALLING + "/done")
        with self.store.tx() as tx:
            tx.set_flow(state=SELFTEST)
            tx.add("installed", version, "ok", str(self.releases.path(version)))
        _fault(SELFTEST)
        ok, output = self.releases.selftest(version, config=self._selftest_config)
        if not ok:
            with self.store.tx() as tx:
                tx.idle()
                tx.refuse(version, "self-test failed")
                tx.add("selftest_failed", version, "failed", output)
            workdir.cleanup(self.dir)
            return Outcome(SELFTEST_FAILED, version, f"{version} failed its self-test: {output}")
        _fault(SELFTEST + "/done")
        self._persist(SWITCHING)
        return self._switch(version)

    def _finish_switch(self, version: str) -> Outcome:
        """Resume an interrupted switch, unless a newer release has become current since
        (a Debian package upgrade in between, images/deb/postinst): never switch back down."""
        current = self.releases.current()
        try:
            newer = current is not None and Version(current) > Version(version)
        except InvalidVersion:
            newer = False
        if not newer:
            return self._switch(version)
        with self.store.tx() as tx:
            tx.idle()
            tx.add("failed", version, "superseded", f"{current} was installed meanwhile")
        workdir.cleanup(self.dir)
        return Outcome(
            UP_TO_DATE, current, f"{current} was installed meanwhile: {version} is not switched to"
        )

    def _switch(self, version: str) -> Outcome:
        try:
            self.releases.adopt()
            self.releases.switch(version)
        except ReleaseError as exc:
            # the release went missing (pruned, disk): install it again on the next run
            return self._retry(f"switching to {version}: {exc}", step=INSTALLING)
        _fault(SWITCHING + "/done")
        workdir.cleanup(self.dir)  # before the trial is recorded: a resumed switch cleans up too
        with self.store.tx() as tx:
            frm = tx.flow.get("from_version")
            tx.set_flow(state=TRIAL, trial_starts=0, trial_deadline=None, error=None)
            tx.add("switched", version, "ok", f"from {frm}")
        _fault(TRIAL)
        return Outcome(
            SWITCHED,
            version,
            f"switched to {version}; it runs in trial from the next service start "
            "(systemctl restart citygate)",
            restart=True,
        )

    def _retry(self, error: str, *, step: str | None = None) -> Outcome:
        """A step failed for a reason that may pass: keep the step (the next run resumes)."""
        flow = self.store.flow()
        if int(flow.get("attempt", 1)) >= ATTEMPTS_MAX:
            return self._give_up(flow.get("target"), error)
        attempt = f"attempt {flow.get('attempt', 1)} of {ATTEMPTS_MAX}; the next run retries"
        with self.store.tx() as tx:
            tx.set_flow(error=error, **({"state": step} if step else {}))
            tx.add("failed", flow.get("target"), "retry", f"{error} ({attempt})")
        log.info("OTA %s failed: %s", attempt, error)
        return Outcome(RETRY, flow.get("target"), f"{error} ({attempt})")

    def _give_up(self, target: str | None, error: str) -> Outcome:
        with self.store.tx() as tx:
            tx.idle()
            tx.add("failed", target, "failed", f"gave up after {ATTEMPTS_MAX} attempts: {error}")
        workdir.cleanup(self.dir)
        return Outcome(FAILED, target, f"gave up after {ATTEMPTS_MAX} attempts: {error}")

    def _reject(self, version: str | None, why: str, *, refuse: bool) -> Outcome:
        """A security or validity failure: never retried silently; reported, flow idle."""
        with self.store.tx() as tx:
            tx.idle()
            if refuse and version is not None:
                tx.refuse(version, why)
            tx.add("rejected", version, "rejected", why)
        workdir.cleanup(self.dir)
        log.error("OTA update rejected: %s", why)
        return Outcome(REJECTED, version, why)

    # -- the trial (agent.ota.trial) ---------------------------------------------------

    def guard(self) -> str:
        """Before a service start (run from the committed release): count a trial start;
        roll back when there were too many or the deadline has passed."""
        return self._trial.guard()

    def trial_begin(self, own_version: str) -> float | None:
        """The agent started: when it is the release in trial, the trial deadline (unix s),
        set on the first start and kept after."""
        return self._trial.begin(own_version)

    def trial_commit(self, own_version: str) -> None:
        """The release in trial got a signed health message acknowledged: keep it."""
        self._trial.commit(own_version)

    def trial_fail(self, own_version: str, reason: str) -> None:
        """The release in trial did not prove itself: switch back to the committed one."""
        self._trial.fail(own_version, reason)


def manager_for(config: Config, *, root: Path | None = None) -> OtaManager:
    """The flow of the gateway `config` describes (`root` overrides ota.root)."""
    settings = config.ota if root is None else dataclasses.replace(config.ota, root=root)
    return OtaManager(
        config.gateway.state_dir,
        settings,
        clock_trusted=clock_trusted_for(config),
        selftest_config=config.source,
        client_cert=config.identity.cert,
        client_key=config.identity.key,
    )
