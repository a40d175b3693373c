"""`citygate doctor`'s update lines: the trusted root, the release links, the update state.

Real files throughout: root metadata made and signed by images.repo (and re-signed with
too few keys through its Repository API), release roots with real symlinks, and update
state written by the flow's own store (agent.ota.store), read back by the doctor.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root

from agent.config import load_config
from agent.ota.store import StateStore
from images import repo as repo_tool
from provisioning.doctor_checks import Check, Status
from provisioning.doctor_ota import check_updates, judge_update_root
from tests.test_ota_flow import committed_release

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TUF repository with the default policy: root signed by 2 of 3 keys."""
    directory = tmp_path_factory.mktemp("doctor-ota") / "repo"
    assert repo_tool.main(["init", str(directory)]) == 0
    return directory


def _config(tmp: Path, **ota: object) -> Path:
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in ota.items())
    config = tmp / "gateway.toml"
    config.write_text(
        f'[gateway]\nstate_dir = "{tmp / "state"}"\n'
        '[identity]\nkey = "id/k"\ncert = "id/c"\nca = "id/ca"\n'
        '[broker]\nhost = "mqtt.example.city"\n'
        f"[ota]\n{lines}"
    )
    return config


def _lines(config: Path) -> dict[str, Check]:
    return {check.name: check for check in check_updates(load_config(config))}


def _gateway(tmp: Path, repository: Path, **ota: object) -> Path:
    """A gateway set up for updates: trusted root, release 1.0 current and committed."""
    committed_release(tmp / "opt")
    return _config(
        tmp,
        repo="https://updates.example.city/fleet",
        root=str(tmp / "opt"),
        trusted_root=str(repository / "metadata/1.root.json"),
        **ota,
    )


def _store(tmp: Path) -> StateStore:
    return StateStore(tmp / "state/ota")


# -- not set up, and set up well ---------------------------------------------------------


def test_a_gateway_without_updates_set_up_gets_one_ok_line_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, root=str(tmp_path / "opt"), trusted_root=str(tmp_path / "r.json"))
    checks = check_updates(load_config(config))
    assert [(c.name, c.status) for c in checks] == [("updates", Status.OK)]
    assert checks[0].message.startswith("not set up here (no ota.repo, no release root")
    assert not (tmp_path / "state").exists()


def test_a_healthy_setup_passes_and_names_the_root_version_and_the_releases(
    tmp_path: Path, repository: Path
) -> None:
    config = _gateway(tmp_path, repository)
    with _store(tmp_path).tx() as tx:
        tx.add("committed", "1.0", "ok", "from 0.9")
    lines = _lines(config)
    assert list(lines) == ["update root", "releases", "updates"]
    assert {c.status for c in lines.values()} == {Status.OK}, lines
    assert ": version 1, 2 of 3 root key(s), valid until " in lines["update root"].message
    assert lines["releases"].message == "current 1.0, committed 1.0 (releases here: 1.0)"
    assert lines["updates"].message.startswith("idle; last step ota_committed 1.0 on ")
    assert lines["updates"].details == ()


def test_the_newest_accepted_root_is_named_and_a_corrupt_one_fails_with_what_to_remove(
    tmp_path: Path, repository: Path
) -> None:
    config = _gateway(tmp_path, repository)
    cache = tmp_path / "state/ota/metadata"
    cache.mkdir(parents=True)
    (cache / "root.json").write_bytes((repository / "metadata/1.root.json").read_bytes())
    accepted = f"; accepted since: version 1, 2 of 3 root key(s), valid until {_expiry(repository)}"
    assert _lines(config)["update root"].message.endswith(accepted)
    (cache / "root.json").write_text("{")
    check = _lines(config)["update root"]
    assert check.status is Status.FAIL
    assert check.message.startswith(f"the cached root {cache / 'root.json'} is not TUF metadata")
    assert check.hint.startswith(f"stop the agent and remove {cache}")


def _expiry(repository: Path) -> str:
    root = Metadata[Root].from_file(str(repository / "metadata/1.root.json")).signed
    return f"{root.expires:%Y-%m-%d %H:%M} UTC"


# -- the trusted root --------------------------------------------------------------------


def test_an_expired_trusted_root_is_fine_it_is_only_the_starting_point(repository: Path) -> None:
    path = repository / "metadata/1.root.json"
    later = NOW + timedelta(days=400)  # the default root lasts 365 days
    check = judge_update_root(path, path.read_bytes(), repo="x", cached=None, now=later)
    assert check.status is Status.OK
    assert f"expired {_expiry(repository)}, fine for a starting point" in check.message


def test_a_root_signed_by_fewer_keys_than_its_threshold_fails(
    repository: Path, tmp_path: Path
) -> None:
    signers = repo_tool.Repository.load(repository).signers("root")
    metadata = Metadata[Root].from_file(str(repository / "metadata/1.root.json"))
    metadata.signed.version = 2
    metadata.signatures.clear()
    metadata.sign(signers[0])  # 1 of the 2 needed
    data = metadata.to_bytes()
    check = judge_update_root(tmp_path / "r.json", data, repo="x", cached=None, now=NOW)
    assert check.status is Status.FAIL
    assert check.message.endswith(
        "(version 2) is signed by 1 of its 3 root key(s) and needs 2: the update client refuses it"
    )
    metadata.sign(signers[1], append=True)
    data = metadata.to_bytes()
    good = judge_update_root(tmp_path / "r.json", data, repo="x", cached=None, now=NOW)
    assert good.status is Status.OK


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{}", "is not TUF metadata"),
        ("not json", "is not TUF metadata"),
        ("1.targets.json", "is TUF targets metadata, not root metadata"),
    ],
    ids=["empty-object", "garbage", "targets"],
)
def test_a_file_that_is_not_root_metadata_fails_and_says_where_to_get_one(
    repository: Path, tmp_path: Path, content: str, says: str
) -> None:
    published = repository / "metadata" / content
    data = published.read_bytes() if content.endswith(".json") else content.encode()
    path = tmp_path / "update-root.json"
    check = judge_update_root(path, data, repo="x", cached=None, now=NOW)
    assert check.status is Status.FAIL
    assert check.message.startswith(f"{path} {says}"), check.message
    assert "1.root.json of the update repository" in check.hint


def test_a_missing_root_fails_with_a_repository_and_is_warned_without(tmp_path: Path) -> None:
    path = tmp_path / "update-root.json"
    with_repo = judge_update_root(path, None, repo="https://u/fleet", cached=None, now=NOW)
    assert with_repo.status is Status.FAIL
    assert with_repo.message == (
        f"no trusted root {path}: updates from https://u/fleet cannot be checked"
    )
    without = judge_update_root(path, None, repo="", cached=None, now=NOW)
    assert without.status is Status.WARN


# -- the release links -------------------------------------------------------------------


def _relink(root: Path, name: str, target: str) -> None:
    (root / name).unlink()
    (root / name).symlink_to(target)


def _second_release(root: Path) -> None:
    (root / "releases/2.0/bin").mkdir(parents=True)
    (root / "releases/2.0/bin/citygate").write_text("#!/bin/sh\n")


def test_broken_or_missing_links_are_pinpointed_with_what_to_do(
    tmp_path: Path, repository: Path
) -> None:
    config = _gateway(tmp_path, repository)
    root = tmp_path / "opt"

    _relink(root, "committed", "releases/0.9")
    check = _lines(config)["releases"]
    assert (check.status, check.message) == (
        Status.FAIL,
        f"{root}/committed -> releases/0.9 is broken: a bad update could not be rolled back",
    )
    assert check.hint.endswith(f"sudo -u citygate ln -sfn releases/1.0 {root}/committed")

    (root / "committed").unlink()
    check = _lines(config)["releases"]
    assert check.status is Status.WARN
    assert check.message == "current is 1.0; there is no committed link yet"

    _relink(root, "current", "releases/3.0")
    check = _lines(config)["releases"]
    assert check.status is Status.FAIL
    assert check.message == f"{root}/current is -> releases/3.0, broken: the service cannot start"

    (root / "current").unlink()
    assert _lines(config)["releases"].message == (
        f"{root}/current is missing: the service cannot start"
    )


def test_current_apart_from_committed_is_warned_unless_it_is_on_trial(
    tmp_path: Path, repository: Path
) -> None:
    config = _gateway(tmp_path, repository)
    root = tmp_path / "opt"
    _second_release(root)
    _relink(root, "current", "releases/2.0")
    check = _lines(config)["releases"]
    assert check.status is Status.WARN
    assert "current differs from committed and no trial runs" in check.message

    with _store(tmp_path).tx() as tx:
        tx.set_flow(state="trial", target="2.0", from_version="1.0", trial_starts=1)
    assert _lines(config)["releases"].status is Status.OK


# -- the update state --------------------------------------------------------------------


def _state(tmp: Path, repository: Path, **flow: Any) -> dict[str, Check]:
    config = _gateway(tmp, repository)
    with _store(tmp).tx() as tx:
        tx.set_flow(**flow)
    return _lines(config)


def test_a_release_on_trial_is_ok_and_past_its_deadline_is_warned(
    tmp_path: Path, repository: Path
) -> None:
    deadline = NOW.timestamp() + 300
    flow = {"state": "trial", "target": "2.0", "trial_starts": 1, "trial_deadline": deadline}
    lines = _state(tmp_path, repository, **flow)
    assert lines["updates"].status is Status.OK
    assert lines["updates"].message.startswith("2.0 is on trial (started 1 of 3 time(s), deadline")

    with _store(tmp_path).tx() as tx:
        tx.set_flow(trial_deadline=NOW.timestamp() - 1)
    check = _lines(tmp_path / "gateway.toml")["updates"]
    assert check.status is Status.WARN
    assert check.hint.endswith("sudo systemctl restart citygate")


def test_a_rollback_is_said_in_words_with_the_refused_version_and_the_last_failure(
    tmp_path: Path, repository: Path
) -> None:
    config = _gateway(tmp_path, repository)
    with _store(tmp_path).tx() as tx:
        tx.add("switched", "2.0", "ok", "from 1.0")
        tx.refuse("2.0", "rolled back: started 4 times (limit 3)")
        tx.add("rolled_back", "2.0", "rolled_back", "started 4 times (limit 3); current is 1.0")
    check = _lines(config)["updates"]
    assert check.status is Status.WARN
    assert check.message.startswith("the update to 2.0 was rolled back on ")
    assert "it will not be installed again by itself" in check.message
    assert check.hint.endswith("sudo -u citygate citygate ota apply --force")
    assert check.details[0] == "refused 2.0: rolled back: started 4 times (limit 3)"
    assert check.details[1].startswith("last failure: ")
    last = "ota_rolled_back 2.0: started 4 times (limit 3); current is 1.0"
    assert check.details[1].endswith(last)


@pytest.mark.parametrize(
    ("step", "outcome", "says"),
    [
        ("selftest_failed", "failed", "the update to 3.0 failed its self-test on "),
        ("rejected", "rejected", "an update was rejected on "),
        ("failed", "failed", "the update to 3.0 gave up on "),
    ],
)
def test_each_kind_of_failure_is_warned_in_words(
    tmp_path: Path, repository: Path, step: str, outcome: str, says: str
) -> None:
    config = _gateway(tmp_path, repository)
    with _store(tmp_path).tx() as tx:
        tx.add(step, "3.0", outcome, "why it failed")
    check = _lines(config)["updates"]
    assert check.status is Status.WARN
    assert check.message.startswith(says), check.message
    assert check.hint


def test_an_update_stopped_by_an_error_is_warned_and_one_in_progress_is_ok(
    tmp_path: Path, repository: Path
) -> None:
    error = "downloading citygate-2.0.bundle: connection reset"
    lines = _state(tmp_path, repository, state="downloading", target="2.0", attempt=2, error=error)
    check = lines["updates"]
    assert check.status is Status.WARN
    assert check.message == (
        "the update to 2.0 stopped while downloading (attempt 2 of 3): "
        "downloading citygate-2.0.bundle: connection reset"
    )
    assert check.hint.endswith("sudo -u citygate citygate ota apply")

    with _store(tmp_path).tx() as tx:
        tx.set_flow(error=None)
    check = _lines(tmp_path / "gateway.toml")["updates"]
    assert (check.status, check.message) == (
        Status.OK,
        "the update to 2.0 is in progress (downloading, attempt 2 of 3)",
    )


def test_a_corrupt_state_file_is_warned_and_left_as_it_is(tmp_path: Path, repository: Path) -> None:
    config = _gateway(tmp_path, repository)
    state = tmp_path / "state/ota/state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"ota": ')
    check = _lines(config)["updates"]
    assert check.status is Status.WARN
    assert check.message.startswith(f"{state} is unreadable (")
    assert state.read_text() == '{"ota": '  # the doctor writes nothing
    assert os.listdir(state.parent) == ["state.json"]
