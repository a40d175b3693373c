"""The OTA flow end to end: real TUF repositories, real bundles, real venv installs, real
processes (`python -m agent.ota.cli ...`), real SIGKILLs.

Releases: the *committed* release 1.0 every test starts from is a directory made here,
not a venv: its `bin/citygate` is a tiny shell wrapper that answers `selftest` and `run`
itself and hands `ota ...` to `python -m agent.ota.cli` of the tree under test. That is
how the guard runs in production too (ExecStartPre=<root>/committed/bin/citygate ota
guard): the guard is the committed release's code, and in these tests the committed
release's OTA code *is* the tree under test; a fake wheel cannot delegate to it.

The releases the flow installs (2.0 good, 3.0 failing its self-test) are real wheels
built with tests/ota_fixtures.make_wheel, bundled with make_bundle, offered by a
repository made with images.repo, and installed by agent.ota.release into a venv. Their
`citygate` answers `selftest` (exit 0, or 1 for the bad one) and `run` (always crashes:
the crash-loop test counts its starts).

`CITYGATE_OTA_KILL_AT` is the flow's test-rig fault injector: the flow process SIGKILLs
itself right after the named point (agent/ota/flow.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import load_config
from agent.ota.flow import OtaManager, manager_for
from images import repo as repo_tool
from tests.ota_fixtures import make_bundle, make_wheel

pytestmark = pytest.mark.integration

TREE = Path(__file__).resolve().parent.parent
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
TIMEOUT_S = 120

FAKE_CITYGATE = """\
import os, sys, time
from pathlib import Path

VERSION = {version!r}
SELFTEST_OK = {ok!r}


def main():
    args = sys.argv[1:]
    if args[:1] == ["selftest"]:
        gate = os.environ.get("FAKE_SELFTEST_GATE")
        if gate:  # the two-applies test holds the first run here
            end = time.monotonic() + 60
            while not Path(gate).exists() and time.monotonic() < end:
                time.sleep(0.05)
        print("fake citygate", VERSION, "selftest", "ok" if SELFTEST_OK else "FAILED")
        return 0 if SELFTEST_OK else 1
    if args[:1] == ["run"]:
        log = os.environ.get("FAKE_RUN_LOG")
        if log:
            with open(log, "a") as f:
                f.write(VERSION + "\\n")
        print("fake citygate", VERSION, "crashes on start", file=sys.stderr)
        return 1
    return 2
"""

COMMITTED_WRAPPER = """\
#!/bin/sh
# release 1.0 (made by the test): its OTA code is the tree under test
case "$1" in
  selftest) echo "release 1.0 ok"; exit 0 ;;
  run) echo "release 1.0 runs"; exit 0 ;;
  ota) shift; PYTHONPATH={tree} exec {python} -m agent.ota.cli "$@" ;;
esac
exit 2
"""


def fake_wheel(directory: Path, version: str, *, selftest_ok: bool) -> Path:
    """A citygate wheel whose `citygate selftest` passes or fails (also tests/test_ota_https)."""
    source = FAKE_CITYGATE.format(version=version, ok=selftest_ok)
    return make_wheel(
        directory / version,
        version=version,
        scripts={"citygate": "fakecitygate:main"},
        files={"fakecitygate.py": source},
    )


def make_repository(directory: Path, bundles: list[Path]) -> Path:
    """A TUF repository made with images.repo offering `bundles`."""
    assert repo_tool.main(["init", str(directory)]) == 0
    for bundle in bundles:
        assert repo_tool.main(["add", str(directory), str(bundle)]) == 0
    return directory


@dataclass(frozen=True)
class Repos:
    good: Path  # offers 2.0
    bad: Path  # offers 2.0 and 3.0 (3.0 fails its self-test)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Repos:
    base = tmp_path_factory.mktemp("ota-repos")
    wheels = base / "wheels"
    good = make_bundle(base, "2.0", [fake_wheel(wheels, "2.0", selftest_ok=True)])
    bad = make_bundle(base, "3.0", [fake_wheel(wheels, "3.0", selftest_ok=False)])
    return Repos(
        good=make_repository(base / "repo-good", [good]),
        bad=make_repository(base / "repo-bad", [good, bad]),
    )


@dataclass
class Gateway:
    """A gateway's files: config, state dir, release root with release 1.0 committed."""

    tmp: Path
    config: Path
    root: Path
    state: Path
    env: dict[str, str]

    def cli(
        self, *args: str, kill_at: str | None = None, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.ota.cli", *args, "--config", str(self.config)],
            env=self._env(kill_at, extra_env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    def popen(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.ota.cli", *args, "--config", str(self.config)],
            env=self._env(None, extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def _env(self, kill_at: str | None, extra_env: dict[str, str] | None) -> dict[str, str]:
        env = dict(self.env, **(extra_env or {}))
        if kill_at is not None:
            env["CITYGATE_OTA_KILL_AT"] = kill_at
        return env

    def apply(
        self, repo: Path, *more: str, kill_at: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("apply", "--repo", str(repo), *more, kill_at=kill_at)

    def status(self) -> dict[str, object]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, object] = json.loads(result.stdout)
        return status

    def history(self) -> list[dict[str, object]]:
        result = self.cli("history", "--json")
        assert result.returncode == 0, result.stderr
        rows: list[dict[str, object]] = json.loads(result.stdout)
        return rows

    def steps(self) -> list[object]:
        return [row["step"] for row in self.history()]

    def link(self, name: str) -> str:
        return os.readlink(self.root / name)

    def guard(self, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
        """What systemd's ExecStartPre runs: the guard of the *committed* release."""
        return subprocess.run(
            [self.root / "committed/bin/citygate", "ota", "guard", "--config", self.config],
            env=self._env(kill_at, None),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    def manager(self) -> OtaManager:
        return manager_for(load_config(self.config))

    def assert_current_works(self) -> str:
        """`current` resolves to a complete release whose citygate passes its self-test."""
        current = (self.root / "current").resolve()
        assert current.parent == (self.root / "releases").resolve()
        assert not current.name.startswith(".")
        assert (current / ".citygate-release.json").is_file()
        selftest = subprocess.run(
            [str(self.root / "current/bin/citygate"), "selftest"],
            env=self.env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        assert selftest.returncode == 0, selftest.stdout + selftest.stderr
        return current.name


def committed_release(root: Path) -> None:
    """Release 1.0 under `root`, current and committed (see the module docstring)."""
    release = root / "releases/1.0"
    (release / "bin").mkdir(parents=True)
    wrapper = release / "bin/citygate"
    wrapper.write_text(COMMITTED_WRAPPER.format(tree=TREE, python=sys.executable))
    wrapper.chmod(0o755)
    marker = {"version": "1.0", "installed_at": 1767225600.0}
    (release / ".citygate-release.json").write_text(json.dumps(marker))
    for name in ("current", "committed"):
        (root / name).symlink_to("releases/1.0")


def _gateway(tmp: Path, repos: Repos, **ota: object) -> Gateway:
    root, state = tmp / "opt", tmp / "state"
    committed_release(root)
    settings = {
        "root": str(root),
        "trusted_root": str(repos.good / "metadata/1.root.json"),
        "max_trial_starts": 2,
        **ota,
    }
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    config = tmp / "gateway.toml"
    config.write_text(
        f'[gateway]\nstate_dir = "{state}"\n'
        '[identity]\nkey = "id/k"\ncert = "id/c"\nca = "id/ca"\n'
        '[broker]\nhost = "mqtt.example.city"\n'
        f"[ota]\n{lines}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITYGATE_", "FAKE_"))}
    env["PYTHONPATH"] = str(TREE)
    return Gateway(tmp, config, root, state, env)


@pytest.fixture
def gw(tmp_path: Path, repos: Repos) -> Gateway:
    return _gateway(tmp_path, repos)


# -- the happy path ---------------------------------------------------------------------------


def test_apply_installs_switches_and_trial_commit_keeps_it(gw: Gateway, repos: Repos) -> None:
    result = gw.apply(repos.good)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("switched: switched to 2.0")
    assert gw.assert_current_works() == "2.0"
    assert gw.link("committed") == "releases/1.0"
    status = gw.status()
    assert status["state"] == "trial"
    assert status["target"] == "2.0"
    assert not (gw.state / "ota/downloads").exists()
    assert not (gw.state / "ota/unpack").exists()
    assert gw.steps() == ["offered", "verified", "installed", "switched"]

    again = gw.apply(repos.good)
    assert again.returncode == 0
    assert again.stdout.startswith("in_trial: 2.0 is installed and in trial")

    manager = gw.manager()
    assert gw.guard().stdout.strip() == "citygate ota guard: trial of 2.0: start 1 of 2"
    assert manager.trial_begin("1.0") is None  # not the release on trial
    deadline = manager.trial_begin("2.0")
    assert deadline is not None
    assert manager.trial_begin("2.0") == deadline  # set once
    manager.trial_commit("2.0")
    assert gw.link("committed") == "releases/2.0"
    assert gw.status()["state"] == "idle"
    assert gw.steps()[-2:] == ["trial", "committed"]
    rows = manager.unreported()
    manager.mark_reported([int(str(row["id"])) for row in rows[:3]])
    assert [row["step"] for row in manager.unreported()] == [
        "switched", "trial", "committed",
    ]  # fmt: skip
    up_to_date = gw.apply(repos.good)
    assert up_to_date.returncode == 0
    assert up_to_date.stdout.startswith("up_to_date: 2.0 is up to date")


# -- SIGKILL anywhere --------------------------------------------------------------------------

# Every kill point of the flow, in chains of kills on one gateway (one venv install per
# chain instead of per point): at most two kills before the switch (each resumed run is
# one more attempt at the same target, and the third must be allowed to finish), then
# kills in the switch, which resumes without counting an attempt.
KILL_CHAINS = [
    ("checking", "installing", "switching"),
    ("checking/done", "installing/done", "switching/done"),
    ("downloading", "selftest", "trial"),
    ("downloading/done", "selftest/done"),
]


@pytest.mark.parametrize("chain", KILL_CHAINS, ids=["+".join(c) for c in KILL_CHAINS])
def test_sigkill_at_every_step_leaves_a_working_release_and_the_rerun_completes(
    gw: Gateway, repos: Repos, chain: tuple[str, ...]
) -> None:
    for point in chain:
        killed = gw.apply(repos.good, kill_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout + killed.stderr)
        current = gw.assert_current_works()
        state = gw.manager().status()["state"]
        # the new release is current only once it passed its self-test and the switch began
        assert current == "1.0" or state in ("switching", "trial"), (point, current, state)
        assert state == point.split("/")[0] or point.endswith("/done"), (point, state)
        assert gw.link("committed") == "releases/1.0"

    if chain == KILL_CHAINS[-1]:  # what the agent does when it starts: resume, no repo given
        resumed = gw.manager().resume()
        assert resumed is not None
        assert (resumed.result, resumed.restart) == ("switched", True), resumed
    else:
        rerun = gw.apply(repos.good)
        assert rerun.returncode == 0, rerun.stderr
        assert rerun.stdout.startswith(("switched:", "in_trial:")), rerun.stdout
    assert gw.assert_current_works() == "2.0"
    assert gw.status()["state"] == "trial"
    assert gw.manager().resume() is None  # nothing left to resume
    assert gw.steps().count("switched") == 1
    leftovers = [p.name for p in (gw.root / "releases").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not (gw.state / "ota/unpack").exists()
    assert not (gw.state / "ota/downloads").exists()


def test_a_switch_interrupted_by_a_newer_package_release_is_not_resumed(
    gw: Gateway, repos: Repos
) -> None:
    """Killed before its switch, then the Debian package installs 9.0 (postinst makes it
    current and committed): the resumed flow must not switch the gateway down to 2.0."""
    assert gw.apply(repos.good, kill_at="switching").returncode == -signal.SIGKILL
    assert gw.status()["state"] == "switching"
    package = gw.root / "releases/9.0"
    shutil.copytree(gw.root / "releases/1.0", package, symlinks=True)
    (package / ".citygate-release.json").write_text(json.dumps({"version": "9.0"}))
    for name in ("current", "committed"):
        (gw.root / f"{name}.new").symlink_to("releases/9.0")
        os.replace(gw.root / f"{name}.new", gw.root / name)
    resumed = gw.apply(repos.good)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("up_to_date: 9.0 was installed meanwhile")
    assert (gw.link("current"), gw.status()["state"]) == ("releases/9.0", "idle")
    assert gw.history()[-1]["outcome"] == "superseded"


def test_a_step_that_keeps_dying_is_given_up_after_three_attempts(
    gw: Gateway, repos: Repos
) -> None:
    for _ in range(3):
        assert gw.apply(repos.good, kill_at="installing").returncode == -signal.SIGKILL
    status = gw.status()
    assert (status["state"], status["attempt"]) == ("installing", 3)
    given_up = gw.apply(repos.good, kill_at="installing")
    assert given_up.returncode == 1
    assert given_up.stderr.startswith("failed: gave up after 3 attempts")
    assert gw.status()["state"] == "idle"
    assert gw.steps()[-1] == "failed"
    assert gw.assert_current_works() == "1.0"
    assert not (gw.state / "ota/downloads").exists()


def test_a_failing_download_is_retried_then_given_up_and_reported(
    gw: Gateway, repos: Repos
) -> None:
    mirror = gw.tmp / "mirror"
    shutil.copytree(repos.good, mirror)
    for bundle in (mirror / "targets").glob("*.bundle"):
        bundle.unlink()  # the stick was pulled: the bytes are not there
    results = [gw.apply(mirror) for _ in range(3)]
    assert [r.returncode for r in results] == [1, 1, 1]
    assert [r.stderr.split(":")[0] for r in results] == ["retry", "retry", "failed"]
    failures = [row["outcome"] for row in gw.history() if row["step"] == "failed"]
    assert failures == ["retry", "retry", "failed"]
    assert gw.status()["state"] == "idle"
    assert gw.assert_current_works() == "1.0"


def test_a_bundle_not_matching_its_signed_hashes_is_rejected_not_retried(
    gw: Gateway, repos: Repos
) -> None:
    mirror = gw.tmp / "mirror"
    shutil.copytree(repos.good, mirror)
    for bundle in (mirror / "targets").glob("*.bundle"):
        data = bytearray(bundle.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bundle.write_bytes(bytes(data))
    result = gw.apply(mirror)
    assert result.returncode == 1
    assert result.stderr.startswith("rejected: ")
    assert "signed hashes" in result.stderr
    status = gw.status()
    assert (status["state"], status["refused"]) == ("idle", [])
    assert gw.steps()[-1] == "rejected"
    assert not (gw.state / "ota/downloads").exists()
    assert gw.assert_current_works() == "1.0"


# -- self-test, trial and rollback -------------------------------------------------------------


def test_release_failing_its_selftest_is_not_switched_and_never_retried(
    tmp_path: Path, repos: Repos
) -> None:
    gw = _gateway(tmp_path, repos, trusted_root=str(repos.bad / "metadata/1.root.json"))
    failed = gw.apply(repos.bad)
    assert failed.returncode == 1
    assert failed.stderr.startswith("selftest_failed: 3.0 failed its self-test")
    assert gw.assert_current_works() == "1.0"
    status = gw.status()
    assert (status["state"], status["refused"]) == ("idle", ["3.0"])
    assert gw.steps()[-1] == "selftest_failed"

    # the next check passes over the refused 3.0 and takes 2.0
    second = gw.apply(repos.bad)
    assert second.returncode == 0, second.stderr
    assert gw.assert_current_works() == "2.0"
    assert "selftest_failed" not in gw.steps()[-4:]


def test_crash_looping_release_is_rolled_back_after_n_starts_and_not_retried(
    gw: Gateway, repos: Repos
) -> None:
    assert gw.apply(repos.good).returncode == 0
    runs = gw.tmp / "runs.log"
    env = dict(gw.env, FAKE_RUN_LOG=str(runs))
    outputs = []
    for _ in range(6):  # what systemd does: ExecStartPre (the guard), then ExecStart
        outputs.append(gw.guard().stdout.strip())
        subprocess.run([str(gw.root / "current/bin/citygate"), "run"], env=env, check=False,
                       capture_output=True, timeout=TIMEOUT_S)  # fmt: skip
    assert runs.read_text().split() == ["2.0", "2.0"]  # max_trial_starts = 2
    assert outputs[2].startswith("citygate ota guard: rolled back 2.0 to 1.0: started 3 times")
    assert outputs[3] == "citygate ota guard: not in trial (idle)"
    assert gw.assert_current_works() == "1.0"
    assert gw.status()["refused"] == ["2.0"]
    assert gw.steps()[-1] == "rolled_back"

    again = gw.apply(repos.good)
    assert again.returncode == 0
    assert again.stdout.startswith("up_to_date: 1.0 is up to date")
    assert gw.assert_current_works() == "1.0"
    forced = gw.apply(repos.good, "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("switched: switched to 2.0")
    manager = gw.manager()
    assert manager.trial_begin("2.0") is not None
    manager.trial_commit("2.0")  # it proved itself this time: no longer refused
    assert (gw.link("committed"), gw.status()["refused"]) == ("releases/2.0", [])


def test_trial_deadline_passed_rolls_back_at_the_next_start(tmp_path: Path, repos: Repos) -> None:
    gw = _gateway(tmp_path, repos, trial_deadline_s=0.5, max_trial_starts=5)
    assert gw.apply(repos.good).returncode == 0
    assert gw.guard().stdout.strip().endswith("trial of 2.0: start 1 of 5")
    deadline = gw.manager().trial_begin("2.0")
    assert deadline is not None
    while time.time() <= deadline + 0.2:  # the new release hangs past its deadline
        time.sleep(0.1)
    # the rollback is killed right after it switched back: the next guard finishes it
    killed = gw.guard(kill_at="rollback/switched")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert gw.assert_current_works() == "1.0"
    guard = gw.guard()
    assert guard.stdout.strip() == (
        "citygate ota guard: rolled back 2.0 to 1.0: current is 1.0, not 2.0"
    )
    assert gw.status()["refused"] == ["2.0"]
    assert gw.steps().count("rolled_back") == 1


def test_trial_fail_switches_back_to_the_committed_release(gw: Gateway, repos: Repos) -> None:
    assert gw.apply(repos.good).returncode == 0
    manager = gw.manager()
    assert manager.trial_begin("2.0") is not None
    manager.trial_fail("1.0", "not the release on trial")  # ignored
    assert gw.link("current") == "releases/2.0"
    manager.trial_fail("2.0", "no signed health report acknowledged")
    assert gw.assert_current_works() == "1.0"
    row = gw.history()[-1]
    assert (row["step"], row["version"]) == ("rolled_back", "2.0")
    assert str(row["detail"]).startswith("no signed health report acknowledged")


# -- concurrency and the clock -----------------------------------------------------------------


def test_two_applies_at_once_one_wins_the_other_waits_and_finds_it_done(
    gw: Gateway, repos: Repos
) -> None:
    gate = gw.tmp / "selftest-may-finish"
    gated = {"FAKE_SELFTEST_GATE": str(gate)}
    first = gw.popen("apply", "--repo", str(repos.good), extra_env=gated)
    second: subprocess.Popen[str] | None = None
    try:
        state = gw.state / "ota/state.json"
        end = time.monotonic() + TIMEOUT_S
        while '"selftest"' not in (state.read_text() if state.exists() else ""):
            assert first.poll() is None
            assert time.monotonic() < end
            time.sleep(0.05)
        second = gw.popen("apply", "--repo", str(repos.good), extra_env=gated)
        time.sleep(1.0)  # long enough for the second one to reach the lock (or, unlocked, race)
        assert second.poll() is None  # it waits
        gate.touch()
        out1, err1 = first.communicate(timeout=TIMEOUT_S)
        out2, err2 = second.communicate(timeout=TIMEOUT_S)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (first.returncode, second.returncode) == (0, 0), err1 + err2
    assert out1.startswith("switched: switched to 2.0")
    assert out2.startswith("in_trial: 2.0 is installed and in trial")
    assert gw.steps().count("switched") == 1
    assert gw.steps().count("offered") == 1


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_untrusted_clock_refuses_to_check(gw: Gateway, repos: Repos) -> None:
    wrong_clock = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": "@2020-01-01 00:00:00"}
    result = gw.cli("apply", "--repo", str(repos.good), extra_env=wrong_clock)
    assert result.returncode == 1
    assert result.stderr.startswith("waiting_clock: waiting for a trusted clock")
    assert not (gw.state / "ota/metadata").exists()  # not even the root was fetched
    assert gw.status()["state"] == "idle"
    assert gw.assert_current_works() == "1.0"
