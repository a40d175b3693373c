"""What an update costs a gateway: bundle, install, self-test, downtime, flash.

Every figure comes with a reference measured in the same run and the ratio
figure / reference; nothing passes or fails (STYLE.md, habit 12).

1. bundle: `python -m images.bundle build` of this checkout at 1.0.0 and 1.0.1
   with the dependency cache the end-to-end tests keep
   (`.pytest_cache/d/citygate-bundle-e2e`, the same lock, so a test run and
   this benchmark warm it for each other). The second build is the warm figure.
   Reference: `pip wheel --no-deps` of a copy of the project, offline: the
   citygate wheel alone, what any release needs at the least.
2. install: `agent.ota.bundle.unpack` (bounded, every wheel hash-checked,
   fsynced) against a plain `tarfile` extraction; `Releases.install` (a venv of
   the base interpreter, the bundle's pip run from its wheel with
   --require-hashes, the bytecode compiled, one sync) against a plain
   `python -m venv` + `pip install --no-index --find-links` of the same wheels
   with the venv's own pip, no hash checking, no bytecode. Sizes on disk and
   the bytes written (`write_bytes` of /proc/self/io: the installer processes
   are this process's children, their counts reach it when they are reaped).
3. selftest: `Releases.selftest` of the installed release (no config: the
   checks that need none) against `bin/citygate --version` of the same release
   (interpreter start and the CLI's imports); the median of three each.
4. downtime: the gateway of tests/test_ota_e2e.py — the real agent reading an
   emulated PMS5003 and publishing to a real mosquitto with mTLS, under
   tests/ota_supervisor.py (what the systemd unit does), watched by the
   verifying `hil_tests.observe.Observer`. An operator's `ota/offer` starts the
   update to 1.0.1 (download, verify, install, self-test, switch, exit 75,
   guard, new release on trial, committed after a signed health report). The
   downtime is the gap in telemetry around the start of the new release.
   Reference: a restart of the same (committed) agent under the same
   supervisor, done as `systemctl restart` does it: SIGTERM, wait for the exit,
   start again with ExecStartPre (the guard). A SIGKILL would measure a crash,
   not a restart. `--runs` updates, each on a fresh state directory and broker,
   the release root reset to 1.0.0 in between.
5. flash: the bytes the update wrote, estimated as `write_bytes` over the
   supervisor that ran 1.0.0, the update and 1.0.1, less the restarted agent's
   steady rate (its spool and log) times that span; against what the update
   must write at the least: the download, the unpacked wheels and the release.

`write_bytes` is 0 on tmpfs: everything goes under `--dir` (default /var/tmp).
Run from the repository root: `.venv/bin/python -m bench.ota [--json]
[--runs 3] [--dir /var/tmp] [--cache DIR]`; about a minute with a warm cache.

Trusts: nothing from outside; every key, certificate, repository, bundle and
process is its own (the first build with a cold cache uses the package index).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.ota.bundle import WHEELS, Manifest, read_manifest, unpack
from agent.ota.installer import base_python, clean_env
from agent.ota.release import Releases
from drivers.pms5003.emulator import Pms5003Emulator
from hil_tests.observe import Observer, wait_until
from images.bundle import copy_project
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles, make_lab_pki
from tests.ota_gateway import (
    NEW,
    OLD,
    events,
    gateway_config,
    offer,
    run_python,
    telemetry_gaps,
)
from tests.ota_supervisor import Supervisor

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".pytest_cache" / "d" / "citygate-bundle-e2e"
READINGS = 30  # telemetry of a release before the next step, as tests/test_ota_e2e.py waits
TRIAL_DEADLINE_S = 120.0
SELFTEST_REPEAT = 3
#: guards against a hang, not time limits
FIRST_TELEMETRY_S = 60.0
UPDATE_S = 240.0
AGAIN_S = 30.0
COMMAND_S = 600.0


@dataclass(frozen=True)
class Figure:
    """One figure and its reference from the same run."""

    name: str
    value: float | None
    unit: str
    reference: float | None = None
    against: str = ""  # what the reference is

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.reference:
            return None
        return round(self.value / self.reference, 3)

    def report(self) -> dict[str, object]:
        return {
            "value": self.value,
            "unit": self.unit,
            "reference": self.reference,
            "against": self.against or None,
            "ratio": self.ratio,
        }


@dataclass
class Result:
    directory: Path
    filesystem: str
    sections: dict[str, list[Figure]] = field(default_factory=dict)
    runs: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def report(self) -> dict[str, object]:
        return {
            **{
                name: {f.name: f.report() for f in figures}
                for name, figures in self.sections.items()
            },
            "runs": self.runs,
            "dir": str(self.directory),
            "filesystem": self.filesystem,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Bundles:
    old: Path
    new: Path
    manifest: Manifest  # of the new one


# -- measuring ------------------------------------------------------------------------------


def _write_bytes() -> int:
    """write_bytes of this process, which includes its reaped children's."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise ValueError("no write_bytes in /proc/self/io")


@dataclass
class Span:
    seconds: float = 0.0
    write_bytes: int = 0


@contextmanager
def _span() -> Iterator[Span]:
    """Wall time and bytes written (this process and the children it reaped) inside."""
    span = Span()
    started, written = time.monotonic(), _write_bytes()
    yield span
    span.seconds = time.monotonic() - started
    span.write_bytes = _write_bytes() - written


def _run(args: Sequence[str | Path], *, env: dict[str, str] | None = None) -> str:
    """Run a program to completion; its output, or RuntimeError with the output's end."""
    done = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=COMMAND_S,
        check=False,
        cwd=REPO,
        env=env,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"{args[:4]}: exit {done.returncode}\n{tail}")
    return done.stdout + done.stderr


def _offline_env() -> dict[str, str]:
    """No pip configuration (/etc/pip.conf names an index and constraints) and no index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _disk_bytes(path: Path) -> int:
    """Allocated bytes of the files under `path` (hard links once, symlinks not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            status = os.lstat(Path(directory, name))
            if (status.st_dev, status.st_ino) not in seen:
                seen.add((status.st_dev, status.st_ino))
                total += status.st_blocks * 512
    return total


def _filesystem(path: Path) -> str:
    """The type of the mount holding `path`, from /proc/self/mounts."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype = line.split()[:3]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


# -- 1. bundle ------------------------------------------------------------------------------


@contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """The lock tests/conftest.py takes: one build into the cache at a time."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def bundle_phase(tmp: Path, cache: Path, result: Result) -> Bundles:
    built: dict[str, Path] = {}
    spans: dict[str, Span] = {}
    with _cache_lock(cache):
        for version in (OLD, NEW):
            out = tmp / f"citygate-{version}.bundle"
            with _span() as spans[version]:
                said = _run(
                    [
                        sys.executable,
                        "-m",
                        "images.bundle",
                        "build",
                        "--version",
                        version,
                        "--out",
                        out,
                        "--cache",
                        cache,
                    ]
                )
            if version == OLD and "from the cache, offline" not in said:
                result.notes.append(
                    f"the dependency cache {cache} was cold: the first build used the index"
                )
            built[version] = out
    tree, wheel_dir = tmp / "reference-tree", tmp / "reference-wheel"
    copy_project(REPO, tree)
    with _span() as own_wheel:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--isolated",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-index",
                "--find-links",
                cache / "build-backend",
                "--wheel-dir",
                wheel_dir,
                tree,
            ],
            env=_offline_env(),
        )
    wheel_bytes = sum(w.stat().st_size for w in wheel_dir.glob("*.whl"))
    manifest = read_manifest(built[NEW])
    size = built[NEW].stat().st_size
    result.sections["bundle"] = [
        Figure(
            "build_s",
            round(spans[NEW].seconds, 2),
            "s",
            round(own_wheel.seconds, 2),
            "pip wheel --no-deps of the project (the citygate wheel alone)",
        ),
        Figure(
            "first_build_s",
            round(spans[OLD].seconds, 2),
            "s",
            round(own_wheel.seconds, 2),
            "the same",
        ),
        Figure("bytes", size, "B", wheel_bytes, "the citygate wheel alone"),
        Figure("wheels", len(manifest.wheels), "wheels (pip, the installer, included)"),
    ]
    return Bundles(built[OLD], built[NEW], manifest)


# -- 2. install and 3. selftest -------------------------------------------------------------


def _plain_unpack(bundle: Path, dest: Path) -> None:
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")


def _plain_install(wheels: Path, venv: Path, version: str) -> float:
    """What one would do by hand: a venv with its own pip, the wheels, nothing checked.
    Returns the seconds the venv took (ensurepip installs pip into it)."""
    with _span() as made:
        _run([base_python(), "-m", "venv", venv], env=_offline_env())
    _run(
        [
            venv / "bin" / "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            wheels,
            "--no-compile",
            f"citygate=={version}",
        ],
        env=_offline_env(),
    )
    return made.seconds


def install_phase(tmp: Path, bundle: Path, root: Path, result: Result) -> None:
    """Install `bundle` (1.0.0) as the release root's current and committed release."""
    unpacked, plain = tmp / "unpack", tmp / "plain-unpack"
    with _span() as plain_unpack:
        _plain_unpack(bundle, plain)
    with _span() as own_unpack:
        manifest = unpack(bundle, unpacked)
    releases = Releases(root)
    with _span() as plain_install:
        plain_venv_s = _plain_install(plain / WHEELS, tmp / "plain-venv", manifest.version)
    with _span() as own_install:
        release = releases.install(unpacked, manifest)
    releases.switch(manifest.version)
    releases.commit(manifest.version)
    result.notes.append(
        f"install reference: its `python -m venv` took {plain_venv_s:.2f} s of it (ensurepip "
        "puts pip into the venv; a release has no pip, the bundle's pip runs from its wheel)"
    )
    result.sections["install"] = [
        Figure(
            "unpack_s",
            round(own_unpack.seconds, 3),
            "s",
            round(plain_unpack.seconds, 3),
            "tarfile extraction, nothing checked or synced",
        ),
        Figure(
            "install_s",
            round(own_install.seconds, 2),
            "s",
            round(plain_install.seconds, 2),
            "python -m venv + pip install --no-index --find-links, no hashes, no bytecode",
        ),
        Figure(
            "release_bytes",
            _disk_bytes(release),
            "B on disk",
            _disk_bytes(tmp / "plain-venv"),
            "the plain venv (pip installed in it)",
        ),
        Figure(
            "unpack_write_bytes",
            own_unpack.write_bytes,
            "B",
            plain_unpack.write_bytes,
            "the plain extraction",
        ),
        Figure(
            "install_write_bytes",
            own_install.write_bytes,
            "B",
            plain_install.write_bytes,
            "the plain install",
        ),
    ]
    version_s = _median_s(
        lambda: _run([release / "bin" / "citygate", "--version"], env=clean_env())
    )
    selftest_s = _median_s(lambda: _selftest(releases, manifest.version))
    result.sections["selftest"] = [
        Figure(
            "selftest_s",
            selftest_s,
            "s (median of 3, no --config)",
            version_s,
            "bin/citygate --version of the same release",
        ),
    ]


def _selftest(releases: Releases, version: str) -> None:
    ok, output = releases.selftest(version, config=None)
    if not ok:
        raise RuntimeError(f"the selftest of {version} failed:\n{output}")


def _median_s(action: Callable[[], object]) -> float:
    times = []
    for _ in range(SELFTEST_REPEAT):
        with _span() as span:
            action()
        times.append(span.seconds)
    return round(statistics.median(times), 3)


# -- 4. downtime and 5. flash ---------------------------------------------------------------


@dataclass
class Run:
    """One update and one restart on a fresh state directory and broker."""

    update_gap_s: float | None = None
    restart_gap_s: float | None = None
    update_s: float | None = None  # offer -> the new release started
    update_span: Span = field(default_factory=Span)  # 1.0.0, the update, 1.0.1 until stopped
    restart_span: Span = field(default_factory=Span)  # 1.0.1 restarted, until stopped
    problems: list[str] = field(default_factory=list)

    def estimated_update_write_bytes(self) -> float | None:
        """write_bytes of the update run less the restarted agent's steady rate over it."""
        if self.restart_span.seconds <= 0 or self.update_span.write_bytes <= 0:
            return None
        rate = self.restart_span.write_bytes / self.restart_span.seconds
        return max(0.0, self.update_span.write_bytes - rate * self.update_span.seconds)

    def report(self) -> dict[str, object]:
        estimate = self.estimated_update_write_bytes()
        return {
            "update_gap_s": _round(self.update_gap_s),
            "restart_gap_s": _round(self.restart_gap_s),
            "update_s": _round(self.update_s),
            "update_run_s": round(self.update_span.seconds, 1),
            "update_run_write_bytes": self.update_span.write_bytes,
            "restart_run_s": round(self.restart_span.seconds, 1),
            "restart_run_write_bytes": self.restart_span.write_bytes,
            "update_write_bytes_estimate": None if estimate is None else round(estimate),
            "problems": self.problems,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _gap_around(observer: Observer, moment: float) -> float | None:
    """The gap between telemetry arrivals that holds `moment` (time.monotonic())."""
    return next((b - a for a, b in telemetry_gaps(observer) if a <= moment <= b), None)


def _readings(observer: Observer, more_than: int) -> Callable[[], bool]:
    return lambda: observer.readings_total() >= more_than + READINGS


async def _update_and_restart(
    lab: LabFiles, broker: LabBroker, gateway: tuple[Path, Path], work: Path, seed: int
) -> Run:
    run = Run()
    observer = Observer(lab, broker, ["gw-a"])
    await observer.start()
    with Pms5003Emulator(period_s=0.1, seed=seed, wait_for_host=True) as sensor:
        config = gateway_config(work, lab, broker, sensor.port, gateway, TRIAL_DEADLINE_S)

        def supervisor() -> Supervisor:
            summary = work / "state" / "last-run.json"
            return Supervisor(gateway[0], config, work / "agent.log", summary=summary)

        first = running = supervisor()
        try:
            with _span() as run.update_span:
                first.start()
                await wait_until(
                    _readings(observer, 0), timeout_s=FIRST_TELEMETRY_S, what=f"telemetry of {OLD}"
                )
                offered = time.monotonic()
                await offer(lab, broker, NEW)
                await wait_until(
                    lambda: ("ota_committed", NEW) in events(observer),
                    timeout_s=UPDATE_S,
                    what=f"{NEW} committed",
                )
                await wait_until(
                    _readings(observer, observer.readings_total()),
                    timeout_s=AGAIN_S,
                    what=f"telemetry of {NEW}",
                )
                await first.stop()  # systemctl restart: stop (SIGTERM, wait) ...
            with _span() as run.restart_span:
                running = supervisor()
                running.start()  # ... and start again, the guard first
                await wait_until(
                    _readings(observer, observer.readings_total()),
                    timeout_s=AGAIN_S,
                    what=f"telemetry of {NEW} restarted",
                )
                await running.stop()
        finally:
            for each in (first, running):
                await each.stop()
            await observer.stop()
    if [s.release for s in first.starts] != [OLD, NEW] or first.starts[0].exit_code != 75:
        run.problems.append(f"the update run's starts: {first.starts}")
        return run
    run.update_s = first.starts[1].started_mono - offered
    run.update_gap_s = _gap_around(observer, first.starts[1].started_mono)
    run.restart_gap_s = _gap_around(observer, running.starts[0].started_mono)
    if observer.failures or observer.differing_duplicates():
        run.problems.append(f"observer: {observer.failures[:3]} {observer.differing_duplicates()}")
    return run


async def downtime_phase(
    tmp: Path, root: Path, bundles: Bundles, runs: int, result: Result
) -> list[Run]:
    lab = make_lab_pki(tmp / "pki", clients=["gw-a", "verifier", "operator"])
    repo = tmp / "usb"
    run_python("-m", "images.repo", "init", repo)
    run_python("-m", "images.repo", "add", repo, bundles.new)
    done = []
    for number in range(runs):
        work = tmp / f"run-{number}"
        with LabBroker(
            work / "broker",
            ca_cert=lab.ca_cert,
            server_cert=lab.server_cert,
            server_key=lab.server_key,
            operators=["operator"],
        ) as broker:
            try:
                run = await _update_and_restart(lab, broker, (root, repo), work, 11 + number)
            except AssertionError as exc:  # a wait timed out: say so, keep the other runs
                log = (work / "agent.log").read_text(errors="replace")[-2000:]
                run = Run(problems=[f"{exc}\n{log}"])
        done.append(run)
        result.notes += [f"run {number}: {problem}" for problem in run.problems]
        releases = Releases(root)  # back to 1.0.0 for the next run (prunes 1.0.1)
        releases.switch(OLD)
        releases.commit(OLD)
    return done


def _spread(name: str, values: list[float], references: list[float], unit: str) -> list[Figure]:
    if not values or not references:
        return [Figure(name, None, unit)]
    against = "the gap across a plain restart (systemctl restart)"
    return [
        Figure(f"{name}_{kind}", round(pick(values), 3), unit, round(pick(references), 3), against)
        for kind, pick in (("min", min), ("median", statistics.median), ("max", max))
    ]


def downtime_figures(runs: list[Run], bundles: Bundles, release_bytes: int, result: Result) -> None:
    updates = [r.update_gap_s for r in runs if r.update_gap_s is not None]
    restarts = [r.restart_gap_s for r in runs if r.restart_gap_s is not None]
    took = [r.update_s for r in runs if r.update_s is not None]
    result.sections["downtime"] = [
        *_spread("gap_s", updates, restarts, "s without telemetry"),
        Figure("runs", len(updates), f"updates measured of {len(runs)}"),
        Figure(
            "update_s",
            _round(statistics.median(took)) if took else None,
            "s from the offer to the new release's start (median)",
        ),
    ]
    estimates = [e for r in runs if (e := r.estimated_update_write_bytes()) is not None]
    wheels = sum(w.size for w in bundles.manifest.wheels)
    least = bundles.new.stat().st_size + wheels + release_bytes
    result.sections["flash"] = [
        Figure(
            "update_write_bytes",
            round(statistics.median(estimates)) if estimates else None,
            "B (median, estimated)",
            least,
            "download + unpacked wheels + release on disk",
        ),
    ]
    result.runs = [r.report() for r in runs]


# -- the whole -------------------------------------------------------------------------------


async def measure(directory: Path, cache: Path, runs: int) -> Result:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="citygate-bench-ota-", dir=directory) as scratch:
        tmp = Path(scratch)
        result = Result(tmp, _filesystem(tmp))
        if result.filesystem in ("tmpfs", "ramfs"):
            result.notes.append(f"{tmp} is on {result.filesystem}: write_bytes figures read 0")
        bundles = bundle_phase(tmp, cache, result)
        root = tmp / "opt"
        install_phase(tmp, bundles.old, root, result)
        release_bytes = _disk_bytes(Releases(root).path(OLD))
        done = await downtime_phase(tmp, root, bundles, runs, result)
        downtime_figures(done, bundles, release_bytes, result)
    result.notes += [
        "the restart reference is `systemctl restart`: SIGTERM, the agent's orderly exit, "
        "then a start with the guard (ExecStartPre) first, under the same supervisor",
        "update_write_bytes: write_bytes of the run with the update, less the restarted "
        "agent's steady rate (spool, log) over it; the journal and the flash's own write "
        "amplification come on top",
    ]
    result.seconds = time.monotonic() - started
    return result


def _show(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _human(result: Result) -> str:
    lines = [f"dir: {result.directory} ({result.filesystem})"]
    for section, figures in result.sections.items():
        lines += ["", f"[{section}]"]
        for f in figures:
            line = f"  {f.name:<22}{_show(f.value):>14}  {f.unit}"
            if f.reference is not None:
                line += f"\n  {'':<22}{_show(f.reference):>14}  reference: {f.against}"
                line += f"\n  {'':<22}{_show(f.ratio):>14}  ratio"
            lines.append(line)
    lines += ["", "[runs]"]
    lines += [f"  {number}: {json.dumps(run)}" for number, run in enumerate(result.runs)]
    lines += ["", *(f"note: {note}" for note in result.notes)]
    lines.append(f"took {result.seconds:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=3, help="updates (and restarts) to measure")
    parser.add_argument(
        "--dir", type=Path, default=Path("/var/tmp"), help="where everything goes (a disk)"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="dependency wheels kept between builds"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    threads_before = set(threading.enumerate())
    result = asyncio.run(measure(args.dir, args.cache, args.runs))
    left = [t.name for t in threading.enumerate() if t not in threads_before]
    if left:
        result.notes.append(f"threads left running: {left}")
    print(json.dumps(result.report()) if args.json else _human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
