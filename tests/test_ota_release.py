"""Releases under a root: real venvs, real pip from the bundle's wheel, real kills.

The releases hold a tiny fake `citygate` (tests/ota_fixtures.make_wheel) whose
console script reports its version and plays the self-test the test needs; the
real `citygate selftest` (agent.selftest) is tested against a lab config.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.ota.bundle import Manifest, unpack
from agent.ota.release import MARKER, ReleaseError, Releases
from agent.selftest import main as selftest_main
from agent.selftest import run_selftest
from provisioning.labconfig import write_gateway_config
from provisioning.pki import LabFiles
from tests.ota_fixtures import make_bundle, make_wheel

REPO = Path(__file__).resolve().parents[1]
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))
BASE_BIN = Path(sys.base_prefix) / "bin"  # where the base interpreter of the test venv lives

FAKE = """\
import sys, time

def main():
    args = sys.argv[1:]
    print("fake citygate {version}", *args)
    if args[:1] == ["selftest"]:
        code, sleep, say = 0, 0, "ok"
        if "--config" in args:  # the test's script: "<exit code> <sleep s> <words>"
            code, sleep, say = open(args[args.index("--config") + 1]).read().split(" ", 2)
        print("selftest says:", say)
        time.sleep(float(sleep))
        return int(code)
    return 0
"""


def fake_wheel(
    directory: Path, version: str, *, requires: tuple[str, ...] = (), extra: str = ""
) -> Path:
    """A citygate wheel whose `citygate` prints its version and plays a scripted selftest."""
    return make_wheel(
        directory / f"w-{version}",
        version=version,
        scripts={"citygate": "fakecg:main"},
        files={"fakecg.py": FAKE.format(version=version) + extra},
        requires=requires,
    )


def unpacked(
    tmp: Path, version: str, wheels: list[Path], *, python: str | None = None
) -> tuple[Path, Manifest]:
    """A bundle of `wheels` made and unpacked as the flow would; (directory, manifest)."""
    bundle = make_bundle(tmp / f"citygate-{version}.bundle", version, wheels, python=python)
    dest = tmp / f"unpacked-{version}"
    return dest, unpack(bundle, dest)


def release_of(tmp: Path, version: str) -> tuple[Path, Manifest]:
    """An unpacked bundle of a fake citygate `version` alone."""
    return unpacked(tmp, version, [fake_wheel(tmp, version)])


def run_citygate(release: Path, *args: str) -> str:
    result = subprocess.run(
        [release / "bin/citygate", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def hand_made(root: Path, *versions: str) -> Releases:
    """Releases without pip (as the Debian package leaves them): enough for link tests."""
    for version in versions:
        script = root / "releases" / version / "bin/citygate"
        script.parent.mkdir(parents=True)
        script.write_text("#!/bin/sh\n")
    return Releases(root)


# --- install, switch, commit, prune ---------------------------------------------


def test_installed_releases_switch_commit_and_prune_to_current_committed_and_one_previous(
    tmp_path: Path,
) -> None:
    releases = Releases(tmp_path / "root")
    for version in ("1.0", "1.1", "1.2"):
        directory, manifest = release_of(tmp_path, version)
        path = releases.install(directory, manifest)
        assert path == tmp_path / "root/releases" / version
        releases.switch(version)
        assert run_citygate(tmp_path / "root/current", "--x").split()[:3] == [
            "fake", "citygate", version,
        ]  # fmt: skip
        releases.commit(version)
        assert (releases.current(), releases.committed()) == (version, version)
    assert releases.installed() == ["1.1", "1.2"]  # 1.0 pruned: not current, committed or previous
    assert os.readlink(tmp_path / "root/current") == "releases/1.2"
    assert os.readlink(tmp_path / "root/committed") == "releases/1.2"
    path = releases.path("1.2")
    assert '"version": "1.2"' in (path / MARKER).read_text()
    for script in (path / "bin").iterdir():  # scripts name the final directory, not the partial
        assert script.is_symlink() or b".partial" not in script.read_bytes()
    assert f"home = {BASE_BIN}\n" in (path / "pyvenv.cfg").read_text()
    pycache = list(path.glob("lib/python*/site-packages/__pycache__/fakecg*.pyc"))
    assert pycache
    assert str(path).encode() in pycache[0].read_bytes()  # compiled under the final path
    assert sorted(p.name for p in (tmp_path / "root/releases").iterdir()) == ["1.1", "1.2"]


def test_reinstall_reuses_the_complete_release_and_rebuilds_a_leftover_partial(
    tmp_path: Path,
) -> None:
    releases = Releases(tmp_path / "root")
    directory, manifest = release_of(tmp_path, "2.0")
    leftover = tmp_path / "root/releases/.2.0.partial"
    (leftover / "lib/python3.11/site-packages").mkdir(parents=True)
    (leftover / "lib/python3.11/site-packages/stray.py").write_text("print('half-built')\n")
    path = releases.install(directory, manifest)
    assert not leftover.exists()
    assert list(path.glob("lib/python*/site-packages/stray.py")) == []
    marker = (path / MARKER).stat()
    assert releases.install(directory, manifest) == path
    assert (path / MARKER).stat().st_ino == marker.st_ino  # reused, not rebuilt
    assert "fake citygate 2.0" in run_citygate(path)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return found + [d for c in found for d in _children(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


INSTALL = """\
import sys
from pathlib import Path
from agent.ota.bundle import parse_manifest
from agent.ota.release import Releases
root, unpacked = Path(sys.argv[1]), Path(sys.argv[2])
manifest = parse_manifest((unpacked / "manifest.json").read_bytes())
print(Releases(root).install(unpacked, manifest))
"""


def install_in(python: Path, root: Path, directory: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{SITE}"}
    return subprocess.Popen(
        [python, "-c", INSTALL, root, directory],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("phase", ["pip", "compileall"])
def test_install_killed_while_installing_is_finished_by_the_next_install(
    tmp_path: Path, phase: str
) -> None:
    bulky = make_wheel(
        tmp_path / "bulky", "bulky", "1.0", files={f"bulky/m{i}.py": "x = 1\n" for i in range(800)}
    )
    citygate = fake_wheel(tmp_path, "3.0", requires=("bulky==1.0",))
    directory, manifest = unpacked(tmp_path, "3.0", [citygate, bulky])
    root = tmp_path / "root"
    installer = install_in(Path(sys.executable), root, directory)
    orphans: list[int] = []
    deadline = time.monotonic() + 60
    while not orphans and installer.poll() is None and time.monotonic() < deadline:
        busy = [p for p in _children(installer.pid) if phase in _cmdline(p)]
        if busy and any((root / "releases/.3.0.partial").glob("lib/python*/site-packages/bulky")):
            orphans = busy
        time.sleep(0.01)
    assert orphans, f"never saw {phase} running: {installer.communicate()[0]}"
    installer.send_signal(signal.SIGKILL)  # power cut of the agent mid-install
    installer.wait()
    assert (root / "releases/.3.0.partial").exists()
    assert not (root / "releases/3.0").exists()
    try:
        path = Releases(root).install(directory, manifest)
        assert not any(_running(p) for p in orphans)  # it waited for the orphaned installer
    finally:
        for pid in orphans:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["3.0"]
    assert "fake citygate 3.0" in run_citygate(path)
    check = subprocess.run(
        [path / "bin/python", "-c", "import bulky.m799, fakecg; print(bulky.m799.x)"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert check.stdout == "1\n"


def test_install_from_a_release_makes_a_venv_of_the_base_python(tmp_path: Path) -> None:
    root = tmp_path / "root"
    releases = Releases(root)
    first = releases.install(*release_of(tmp_path, "4.0"))
    releases.switch("4.0")
    releases.commit("4.0")
    directory, _ = release_of(tmp_path, "4.1")
    installer = install_in(first / "bin/python", root, directory)  # the agent runs from 4.0
    output = installer.communicate(timeout=120)[0]
    assert installer.returncode == 0, output
    second = releases.path("4.1")
    assert f"home = {BASE_BIN}\n" in (second / "pyvenv.cfg").read_text()  # not releases/4.0/bin
    releases.switch("4.1")
    releases.commit("4.1")
    releases.prune({"4.1"})
    assert releases.installed() == ["4.1"]
    assert "fake citygate 4.1" in run_citygate(second)  # does not need the release it came from


# --- refusals -------------------------------------------------------------------


def test_a_wheel_that_does_not_match_its_pinned_hash_is_refused_by_pip(tmp_path: Path) -> None:
    directory, manifest = release_of(tmp_path, "5.0")
    wheel = directory / "wheels/citygate-5.0-py3-none-any.whl"
    wheel.write_bytes(fake_wheel(tmp_path / "evil", "5.0", extra="EVIL = 1\n").read_bytes())
    releases = Releases(tmp_path / "root")
    with pytest.raises(ReleaseError, match=r"pip install failed .*(?s:.*)(?i:hash)"):
        releases.install(directory, manifest)
    assert list((tmp_path / "root/releases").iterdir()) == []
    assert releases.installed() == []


def test_a_dependency_without_a_pinned_hash_is_refused_by_pip(tmp_path: Path) -> None:
    citygate = fake_wheel(tmp_path, "5.1", requires=("unpinned==1.0",))
    directory, manifest = unpacked(tmp_path, "5.1", [citygate])
    make_wheel(directory / "wheels", "unpinned", "1.0")  # offered, but not in requirements.txt
    releases = Releases(tmp_path / "root")
    with pytest.raises(ReleaseError, match="pip install failed"):
        releases.install(directory, manifest)
    assert list((tmp_path / "root/releases").iterdir()) == []


def test_a_release_for_another_python_is_refused(tmp_path: Path) -> None:
    directory, manifest = unpacked(tmp_path, "6.0", [fake_wheel(tmp_path, "6.0")], python="3.10")
    releases = Releases(tmp_path / "root")
    with pytest.raises(ReleaseError, match=r"built for Python 3\.10"):
        releases.install(directory, manifest)
    assert releases.installed() == []


def test_a_base_interpreter_of_another_version_is_refused(tmp_path: Path) -> None:
    directory, manifest = release_of(tmp_path, "6.1")
    other = tmp_path / "python3.12"
    other.write_text("#!/bin/sh\necho 3.12\n")
    other.chmod(0o755)
    with pytest.raises(ReleaseError, match=r"is Python 3\.12"):
        Releases(tmp_path / "root").install(directory, manifest, python=other)
    assert not (tmp_path / "root/releases/6.1").exists()


def test_a_bundle_whose_citygate_wheel_has_another_version_is_refused(tmp_path: Path) -> None:
    wrong = fake_wheel(tmp_path, "7.1")
    directory, manifest = unpacked(tmp_path, "7.0", [wrong])
    with pytest.raises(ReleaseError, match=r"installed citygate 7\.1"):
        Releases(tmp_path / "root").install(directory, manifest)
    assert list((tmp_path / "root/releases").iterdir()) == []


def fake_pip(tmp: Path, main: str) -> Path:
    """An installer wheel named pip whose `python pip.whl/pip` runs `main` instead of pip."""
    return make_wheel(
        tmp / "fake-pip", "pip", "99.0", files={"pip/__init__.py": "", "pip/__main__.py": main}
    )


def test_the_installer_runs_offline_without_pip_config(tmp_path: Path) -> None:
    report = """\
import os, sys
print(*sys.argv[1:])
print(*sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("PIP")))
sys.exit(3)
"""
    installer = fake_pip(tmp_path, report)
    bundle = make_bundle(
        tmp_path / "b.bundle", "5.2", [fake_wheel(tmp_path, "5.2")], installer_wheel=installer
    )
    manifest = unpack(bundle, tmp_path / "u")
    with pytest.raises(ReleaseError, match=r"pip install failed \(exit 3\)") as failed:
        Releases(tmp_path / "root").install(tmp_path / "u", manifest)
    argv, env = str(failed.value).splitlines()[-2:]
    assert env.split() == ["PIP_CONFIG_FILE=/dev/null", "PIP_NO_INDEX=1"]
    for flag in ("--no-index", "--require-hashes", "--no-cache-dir", "--only-binary :all:"):
        assert flag in argv
    assert f"--find-links {tmp_path / 'u/wheels'} " in argv
    assert list((tmp_path / "root/releases").iterdir()) == []


def test_an_installer_that_hangs_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    installer = fake_pip(
        tmp_path, "import time\nprint('installing', flush=True)\ntime.sleep(120)\n"
    )
    bundle = make_bundle(
        tmp_path / "b.bundle", "5.3", [fake_wheel(tmp_path, "5.3")], installer_wheel=installer
    )
    manifest = unpack(bundle, tmp_path / "u")
    with pytest.raises(ReleaseError, match=r"pip install timed out(?s:.*)installing"):
        Releases(tmp_path / "root").install(tmp_path / "u", manifest, timeout_s=3.0)
    assert list((tmp_path / "root/releases").iterdir()) == []
    assert not [p for p in _children(os.getpid()) if "pip" in _cmdline(p)]


# --- selftest -------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    """Release 8.0 of the fake citygate, installed once for the selftest tests."""
    tmp = tmp_path_factory.mktemp("selftest")
    releases = Releases(tmp / "root")
    releases.install(*release_of(tmp, "8.0"))
    return releases


def test_selftest_runs_the_release_own_command_and_reports_its_output(
    installed: Releases, tmp_path: Path
) -> None:
    script = tmp_path / "gateway.toml"
    script.write_text("1 0 imports: FAIL boom")
    ok, output = installed.selftest("8.0", config=script)
    assert not ok
    assert (
        output == f"fake citygate 8.0 selftest --config {script}\nselftest says: imports: FAIL boom"
    )
    assert installed.selftest("8.0", config=None) == (
        True,
        "fake citygate 8.0 selftest\nselftest says: ok",
    )


def test_selftest_that_hangs_is_stopped_and_fails(installed: Releases, tmp_path: Path) -> None:
    script = tmp_path / "gateway.toml"
    script.write_text("0 60 stuck")
    ok, output = installed.selftest("8.0", config=script, timeout_s=1.0)
    assert not ok
    assert "selftest says: stuck" in output
    assert "timed out" in output


def test_selftest_of_a_missing_release_fails(tmp_path: Path) -> None:
    ok, output = hand_made(tmp_path / "root").selftest("9.9", config=None)
    assert not ok
    assert "not installed" in output


# --- links ----------------------------------------------------------------------


READER = """\
import os, sys
link, stop = sys.argv[1], sys.argv[2]
reads = misses = 0
print("ready", flush=True)
while not os.path.exists(stop):
    reads += 1
    if not os.path.exists(link):
        misses += 1
print(reads, misses)
"""


def test_switch_is_atomic_for_a_reader_in_another_process(tmp_path: Path) -> None:
    releases = hand_made(tmp_path / "root", "1.0", "2.0")
    releases.switch("1.0")
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, tmp_path / "root/current/bin/citygate", stop],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline() == "ready\n"
        for i in range(1000):
            releases.switch("2.0" if i % 2 == 0 else "1.0")
    finally:
        stop.touch()
        output = reader.communicate(timeout=30)[0]
    reads, misses = map(int, output.split())
    assert reads > 100
    assert misses == 0
    assert releases.current() == "1.0"
    assert [p.name for p in (tmp_path / "root").iterdir() if p.name.endswith(".tmp")] == []


def test_switch_from_a_thread_while_another_reads(tmp_path: Path) -> None:
    releases = hand_made(tmp_path / "root", "1.0", "2.0")
    releases.switch("1.0")
    done = threading.Event()

    def flip() -> None:
        for i in range(2000):
            releases.switch("2.0" if i % 2 == 0 else "1.0")
        done.set()

    thread = threading.Thread(target=flip, name="flip")
    thread.start()
    seen = set()
    try:
        while not done.is_set():
            seen.add(releases.current())
    finally:
        thread.join()
    assert None not in seen


def test_switch_refuses_a_release_that_is_not_installed(tmp_path: Path) -> None:
    releases = hand_made(tmp_path / "root", "1.0")
    (tmp_path / "root/releases/.2.0.partial/bin").mkdir(parents=True)
    with pytest.raises(ReleaseError, match="not installed"):
        releases.switch("2.0")
    with pytest.raises(ReleaseError, match="not a normalised"):
        releases.switch("../1.0")
    assert releases.current() is None


def test_adopt_commits_the_current_release_of_a_debian_install_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    releases = hand_made(root, "0.1.0", "0.2.0")
    (root / "current").symlink_to("releases/0.1.0")  # as the package's postinst leaves it
    releases.adopt()
    assert releases.committed() == "0.1.0"
    releases.switch("0.2.0")
    releases.adopt()  # already there: a release on trial is never adopted
    assert (releases.current(), releases.committed()) == ("0.2.0", "0.1.0")


def test_prune_keeps_current_and_committed_and_removes_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    releases = hand_made(root, "1.0", "1.1", "1.2", "2.0")
    releases.switch("2.0")
    releases.commit("1.1")  # commit keeps 1.1, current 2.0 and the previous 1.0
    assert releases.installed() == ["1.0", "1.1", "2.0"]
    (root / "releases/.3.0.partial").mkdir()
    (root / "releases/.1.2.abcd.removing").mkdir()
    (root / ".current.dead.tmp").symlink_to("releases/gone")
    assert releases.prune(set()) == ["1.0"]
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1.1", "2.0"]
    assert not (root / ".current.dead.tmp").is_symlink()


# --- the real selftest ------------------------------------------------------------


@pytest.fixture
def gateway_config(lab: LabFiles, tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    return write_gateway_config(
        tmp_path / "gateway.toml",
        lab=lab,
        gateway="gw-a",
        broker_port=1,  # never contacted
        state_dir=tmp_path / "state",
        sensors={"pm": {"driver": "pms5003", "port": "/dev/ttyNOPE"}},
    )


def test_real_selftest_passes_with_a_valid_config(
    gateway_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert selftest_main(argparse.Namespace(config=str(gateway_config))) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[1].rstrip(":") for line in lines]
    assert names == ["imports", "cose", "senml", "sqlite", "config", "identity", "state"]
    assert all(line.startswith("ok ") for line in lines), lines
    assert "gateway gw-a" in lines[5]
    assert os.listdir(gateway_config.parent / "state") == []  # its probe file is gone


def test_real_selftest_fails_with_a_missing_key_file(gateway_config: Path, lab: LabFiles) -> None:
    text = gateway_config.read_text()
    gateway_config.write_text(text.replace(str(lab.clients["gw-a"][1]), "/nonexistent/key.pem"))
    results = {name: (ok, detail) for name, ok, detail in run_selftest(gateway_config)}
    assert results["config"][0]
    assert not results["identity"][0]
    assert "/nonexistent/key.pem does not exist" in results["identity"][1]
    script = "import sys, argparse; from agent.selftest import main; " \
             "sys.exit(main(argparse.Namespace(config=sys.argv[1])))"  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", script, gateway_config],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert "FAIL identity: key file /nonexistent/key.pem does not exist" in result.stdout
    assert "ok   cose:" in result.stdout


def test_real_selftest_fails_with_a_broken_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nstate_dir = 3\n")
    results = run_selftest(config)
    assert [(name, ok) for name, ok, _ in results][-1] == ("config", False)
    assert all(ok for name, ok, _ in results if name != "config")
