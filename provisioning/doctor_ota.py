"""The doctor's checks of signed updates: the trusted root, the release links, the update state.

Three lines:

- "update root": `ota.trusted_root` exists and is TUF root metadata signed by a
  threshold of its own root keys (what the update client requires before it trusts
  anything). An expired root is fine: it is only the starting point, newer roots come
  from the repository, each signed by the one before. The newest root this gateway
  has already accepted (state_dir/ota/metadata/root.json) is named when there is one.
- "releases": under `ota.root`, `current` (what the service runs) and `committed`
  (the last release that passed its trial; the guard runs from it and rolls back to
  it) point at complete releases.
- "updates": the update flow's state (idle, an update in progress, a release on
  trial), the versions refused for good, and the last failure, in words a technician
  can act on.

A gateway with no repository, no release root and no trusted root (a development
install, or one updated only by its package) gets one ok line saying so.

Nothing here writes: the state file is read as plain JSON, without the flow's locks
(a read may see the state just before a change; never a torn file, since the flow
replaces the file atomically). The judgements are pure functions of values
(`judge_*`); `check_updates` gathers them.

Trust: the config as agent.config checked it; the root metadata only as far as
tuf.api.metadata parses and verifies it (this is a report, not a trust decision).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from agent.config import Config
from agent.ota.flow import ATTEMPTS_MAX
from agent.ota.release import COMMITTED, CURRENT, Releases
from agent.ota.store import IDLE, TRIAL, Tx
from provisioning.doctor_checks import Check, Status

_APPLY = "sudo -u citygate citygate ota apply"


def _when(moment: float | datetime) -> str:
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, UTC)
    return f"{moment:%Y-%m-%d %H:%M} UTC"


# -- the trusted root --------------------------------------------------------------------


def describe_root(data: bytes, now: datetime) -> str:
    """One phrase about root metadata `data`; ValueError saying what is wrong with it."""
    try:
        metadata = Metadata[Root].from_bytes(data)
    except DeserializationError as exc:
        raise ValueError(f"is not TUF metadata ({exc})") from exc
    root = metadata.signed
    if not isinstance(root, Root):
        raise ValueError(f"is TUF {root.type} metadata, not root metadata")
    result = root.get_verification_result(Root.type, metadata.signed_bytes, metadata.signatures)
    keys = len(root.roles[Root.type].keyids)
    if not result.verified:
        raise ValueError(
            f"(version {root.version}) is signed by {len(result.signed)} of its {keys} root "
            f"key(s) and needs {result.threshold}: the update client refuses it"
        )
    expiry = root.expires
    dated = (
        f"expired {_when(expiry)}, fine for a starting point"
        if root.is_expired(now)
        else f"valid until {_when(expiry)}"
    )
    return f"version {root.version}, {result.threshold} of {keys} root key(s), {dated}"


def judge_update_root(
    path: Path, data: bytes | None, *, repo: str, cached: tuple[Path, bytes] | None, now: datetime
) -> Check:
    """The trusted root file (`data` None: missing or unreadable) and the cached newest root."""
    name = "update root"
    get_root = (
        f"ask the release team for the fleet's root metadata (1.root.json of the update "
        f"repository); put it at {path} or point ota.trusted_root at it"
    )
    if data is None:
        if repo:
            return Check(
                name,
                Status.FAIL,
                f"no trusted root {path}: updates from {repo} cannot be checked",
                get_root,
            )
        return Check(
            name,
            Status.WARN,
            f"no trusted root {path}: no update can be checked or installed",
            get_root,
        )
    try:
        shipped = describe_root(data, now)
    except ValueError as exc:
        return Check(name, Status.FAIL, f"{path} {exc}", get_root)
    message = f"{path}: {shipped}"
    if cached is None:
        return Check(name, Status.OK, message)
    try:
        newest = describe_root(cached[1], now)
    except ValueError as exc:
        return Check(
            name,
            Status.FAIL,
            f"the cached root {cached[0]} {exc}",
            f"stop the agent and remove {cached[0].parent}: the next check starts again "
            f"from {path}",
        )
    return Check(name, Status.OK, f"{message}; accepted since: {newest}")


# -- the release links -------------------------------------------------------------------


@dataclass(frozen=True)
class Links:
    """What `ota.root` holds: each link's text (None: no link) and the release it resolves to."""

    root: Path
    exists: bool
    current_link: str | None
    current: str | None
    committed_link: str | None
    committed: str | None
    installed: tuple[str, ...]


def read_links(root: Path) -> Links:
    releases = Releases(root)

    def link(name: str) -> str | None:
        try:
            return os.readlink(root / name)
        except OSError:
            return None

    return Links(
        root,
        root.is_dir(),
        link(CURRENT),
        releases.current(),
        link(COMMITTED),
        releases.committed(),
        tuple(releases.installed()),
    )


def judge_releases(links: Links, trial_target: str | None) -> Check:
    """`current` and `committed` under the release root; `trial_target`: the release on trial."""
    name, root = "releases", links.root
    reinstall = "reinstall the citygate package (it makes the release root and both links)"
    if not links.exists:
        return Check(
            name,
            Status.FAIL,
            f"no release root {root}: updates cannot be installed",
            f"{reinstall}, or set ota.root",
        )
    known = f"releases here: {', '.join(links.installed) or 'none'}"
    if links.current is None:
        found = "missing" if links.current_link is None else f"-> {links.current_link}, broken"
        return Check(
            name,
            Status.FAIL,
            f"{root}/{CURRENT} is {found}: the service cannot start",
            f"{known}; {reinstall}",
            (known,),
        )
    if links.committed is None and links.committed_link is not None:
        return Check(
            name,
            Status.FAIL,
            f"{root}/{COMMITTED} -> {links.committed_link} is broken: a bad update could not be "
            "rolled back",
            f"if {links.current} runs well, point it there: sudo -u citygate ln -sfn "
            f"releases/{links.current} {root}/{COMMITTED}",
        )
    if links.committed is None:
        return Check(
            name,
            Status.WARN,
            f"current is {links.current}; there is no {COMMITTED} link yet",
            "the next update creates it from current; until then nothing can be rolled back",
        )
    message = f"current {links.current}, committed {links.committed} ({known})"
    if links.current not in (links.committed, trial_target):
        return Check(
            name,
            Status.WARN,
            f"{message}: current differs from committed and no trial runs",
            f"someone switched by hand; if {links.current} runs well make it committed "
            f"(sudo -u citygate ln -sfn releases/{links.current} {root}/{COMMITTED}), "
            f"otherwise switch current back to {links.committed}",
        )
    return Check(name, Status.OK, message)


# -- the update state --------------------------------------------------------------------

_FAILED_STEPS = frozenset({"rolled_back", "selftest_failed", "rejected", "failed"})


def _row(row: dict[str, Any]) -> str:
    return f"{_when(float(row['time']))} ota_{row['step']} {row['version']}: {row['detail']}"


def _last_event(history: list[dict[str, Any]]) -> Check:
    """The idle state, said through its last history row."""
    name = "updates"
    if not history:
        return Check(name, Status.OK, "idle; no update has run yet")
    row = history[-1]
    step, version, when = row["step"], row["version"], _when(float(row["time"]))
    force = f"to try {version} again anyway: {_APPLY} --force"
    report = "send `citygate ota history` to the release team"
    if step == "rolled_back":
        return Check(
            name,
            Status.WARN,
            f"the update to {version} was rolled back on {when} "
            f"({row['detail']}); it will not be installed again by itself",
            f"{report}; a fixed release is taken when published; {force}",
        )
    if step == "selftest_failed":
        return Check(
            name,
            Status.WARN,
            f"the update to {version} failed its self-test on {when}; "
            "it will not be installed again by itself",
            f"{report}; {force}",
        )
    if step == "rejected":
        return Check(
            name,
            Status.WARN,
            f"an update was rejected on {when}: {row['detail']}",
            "the repository served something that failed verification: not fixable on "
            f"the gateway; {report}",
        )
    if step == "failed":
        return Check(
            name,
            Status.WARN,
            f"the update to {version} gave up on {when}: {row['detail']}",
            "check the network path to the repository (ota.repo) "
            f"and free disk; the next check tries again, or now: {_APPLY}",
        )
    return Check(name, Status.OK, f"idle; last step ota_{step} {version} on {when}")


def _trial(flow: dict[str, Any], now: float, max_starts: int) -> Check:
    version, starts = flow.get("target"), int(flow.get("trial_starts", 0))
    deadline = flow.get("trial_deadline")
    if deadline is not None and now > float(deadline):
        return Check(
            "updates",
            Status.WARN,
            f"{version} is on trial and its deadline passed ({_when(float(deadline))})",
            "the next service start switches back to the "
            "committed release: sudo systemctl restart citygate",
        )
    if starts >= max_starts:
        return Check(
            "updates",
            Status.WARN,
            f"{version} is on trial and was started {starts} time(s), the limit",
            "one more start rolls it back: look at why it restarts (journalctl -u citygate)",
        )
    until = f", deadline {_when(float(deadline))}" if deadline is not None else ""
    return Check(
        "updates",
        Status.OK,
        f"{version} is on trial (started {starts} of "
        f"{max_starts} time(s){until}): it is kept once the broker acknowledges "
        "its health report",
    )


def judge_updates(data: dict[str, Any], now: float, max_trial_starts: int) -> Check:
    """The flow state file's contents (TinyDB layout) at wall time `now`."""
    tx = Tx(data, now)
    flow, history = tx.flow, tx.history()
    refused = [
        f"refused {doc['version']}: {doc.get('reason', '')}"
        for doc in data.get("refused", {}).values()
    ]
    failures = [row for row in history if row["step"] in _FAILED_STEPS]
    details = (*refused, *([f"last failure: {_row(failures[-1])}"] if failures else []))
    state = flow["state"]
    if state == IDLE:
        check = _last_event(history)
    elif state == TRIAL:
        check = _trial(flow, now, max_trial_starts)
    else:
        what = f"the update to {flow['target']}" if flow.get("target") else "a check"
        attempt = f"attempt {flow.get('attempt', 1)} of {ATTEMPTS_MAX}"
        if flow.get("error"):
            check = Check(
                "updates",
                Status.WARN,
                f"{what} stopped while {state} ({attempt}): {flow['error']}",
                f"it goes on at the agent's next check or start; to go on now: {_APPLY}",
            )
        else:
            check = Check("updates", Status.OK, f"{what} is in progress ({state}, {attempt})")
    return Check(check.name, check.status, check.message, check.hint, details)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _state_check(path: Path, now: datetime, max_trial_starts: int) -> tuple[Check, str | None]:
    """The "updates" line and the version on trial (None: none)."""
    raw = _read(path)
    try:
        data = json.loads(raw) if raw and raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        return Check(
            "updates",
            Status.WARN,
            f"{path} is unreadable ({data if isinstance(data, Exception) else 'not an object'})",
            "the agent sets it aside and starts idle: the update history is lost, nothing else",
        ), None
    flow = Tx(data, 0.0).flow
    trial = flow.get("target") if flow["state"] == TRIAL else None
    return judge_updates(data, now.timestamp(), max_trial_starts), trial


def check_updates(config: Config, now: datetime | None = None) -> list[Check]:
    """The three update lines (or one, when updates are not set up on this gateway)."""
    ota, moment = config.ota, now or datetime.now(UTC)
    ota_dir = config.gateway.state_dir / "ota"
    if not ota.repo and not ota.root.exists() and not ota.trusted_root.exists():
        return [
            Check(
                "updates",
                Status.OK,
                f"not set up here (no ota.repo, no release root "
                f"{ota.root}, no trusted root {ota.trusted_root}): updates come with the "
                "package",
            )
        ]
    cached_path = ota_dir / "metadata/root.json"
    cached_data = _read(cached_path)
    checks = [
        judge_update_root(
            ota.trusted_root,
            _read(ota.trusted_root),
            repo=ota.repo,
            cached=None if cached_data is None else (cached_path, cached_data),
            now=moment,
        )
    ]
    state_check, trial = _state_check(ota_dir / "state.json", moment, ota.max_trial_starts)
    checks.append(judge_releases(read_links(ota.root), trial))
    checks.append(state_check)
    return checks
