"""One release of the agent as a virtual environment, built elsewhere and relocated.

`build_release` makes `/opt/citygate/releases/<version>` inside a staging root:
`pip wheel` turns the project and its pinned dependencies (and
images/deb/constraints.txt for theirs) into wheels; a virtual environment made
with the gateway's own interpreter path (`/usr/bin/python3.11` on Debian 12 and
Raspberry Pi OS 12) installs them without pip of its own; then the release is
relocated to its final path (script shebangs, activate scripts and pyvenv.cfg
rewritten), its bytecode compiled with the final file names, its extension
modules stripped, and `leftovers` finds any file that still names a build
directory. The same approach as dh-virtualenv, without debhelper.

The gateway needs no network, no pip and no compiler for it. The price: it is
built on the target architecture (wheels hold compiled code) and only runs with
the Python minor version it was built with.

Trust: the project tree and the package index are trusted at build time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = Path("/opt/citygate")
PACKAGE = "citygate"
_MANYLINUX_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


class BuildError(Exception):
    """The package cannot be built; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Release:
    path: Path  # inside the staging root
    final: Path  # where it lives on the gateway
    python_version: str  # "3.11": the package depends on python3.11
    glibc: tuple[int, int]  # the newest glibc a bundled wheel needs


def run(args: Sequence[str | Path], *, what: str, env: dict[str, str] | None = None) -> str:
    """Run one build step; raise BuildError with the end of its output if it fails."""
    environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        check=False,
        env={**environment, **(env or {})},
    )
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def target_python(python: str) -> tuple[Path, str]:
    """The interpreter the release will run on, as the gateway has it, and its X.Y version."""
    path = Path(os.path.realpath(python))
    if path.parent != Path("/usr/bin"):
        raise BuildError(
            f"{python} is {path}: build with the distribution's /usr/bin/python3.X, the "
            "interpreter the gateway has (install python3-venv)"
        )
    version = run(
        [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], what=f"{path} --version"
    ).strip()
    if path.name != f"python{version}":
        raise BuildError(f"{path} reports Python {version}; expected /usr/bin/python{version}")
    return path, version


def _builder(interpreter: Path, directory: Path) -> Path:
    """A virtual environment with pip for the build (kept in `directory` between builds)."""
    python = directory / "bin" / "python"
    if not (python.exists() and os.path.realpath(python) == str(interpreter)):
        shutil.rmtree(directory, ignore_errors=True)
        run([interpreter, "-m", "venv", directory], what="python -m venv (builder)")
    return python


def _wheels(builder: Path, project: Path, wheels: Path) -> None:
    """Wheels of the project (always afresh) and of every dependency, pinned."""
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob(f"{PACKAGE}-*.whl"):
        old.unlink()
    constraints = HERE / "constraints.txt"
    run(
        [builder, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheels,
         "--find-links", wheels, "--constraint", constraints, project],
        what="pip wheel",
    )  # fmt: skip


def _install(builder: Path, interpreter: Path, release: Path, wheels: Path, version: str) -> None:
    run([interpreter, "-m", "venv", "--without-pip", release], what="python -m venv")
    run(
        [builder, "-m", "pip", "--python", release / "bin" / "python", "install", "--quiet",
         "--no-index", "--find-links", wheels, "--no-compile", "--no-warn-script-location",
         "--constraint", HERE / "constraints.txt", f"{PACKAGE}=={version}"],
        what="pip install into the release",
    )  # fmt: skip
    for record in release.glob("lib/python*/site-packages/*.dist-info/direct_url.json"):
        record.unlink()  # it only says which build directory the wheel came from


def _relocate(release: Path, final: Path) -> None:
    """Point scripts, activate files and pyvenv.cfg at the release's final path."""
    old, new = os.fsencode(release), os.fsencode(final)
    for path in [*sorted((release / "bin").iterdir()), release / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))


def _compile(release: Path, stage: Path) -> None:
    """Bytecode for the read-only release, with the file names it has once installed.

    unchecked-hash: the interpreter never compares a .pyc with its source, which is
    right for a release tree that is never changed in place (a new release is a new
    directory) and does not depend on the file times that dpkg restores.
    """
    run(
        [release / "bin" / "python", "-m", "compileall", "-q", "-j", "0",
         "--invalidation-mode", "unchecked-hash", "-s", stage, "-p", "/",
         *sorted(release.glob("lib/python*/site-packages"))],
        what="compileall",
    )  # fmt: skip


def _strip(release: Path) -> None:
    """Debug symbols out of the bundled extension modules (as dh_strip does): less flash."""
    objects = sorted(p for p in release.rglob("*.so") if p.is_file() and not p.is_symlink())
    if objects:
        run(
            ["strip", "--remove-section=.comment", "--remove-section=.note",
             "--strip-unneeded", *objects],
            what="strip (install binutils)",
        )  # fmt: skip


def _glibc_needed(release: Path) -> tuple[int, int]:
    """The newest glibc that the manylinux tag of any installed wheel asks for."""
    needed = (2, 17)
    for wheel_file in release.glob("lib/python*/site-packages/*.dist-info/WHEEL"):
        for line in wheel_file.read_text().splitlines():
            if not line.startswith("Tag: "):
                continue
            platform = line.rsplit("-", 1)[-1]
            if match := re.match(r"manylinux_(\d+)_(\d+)_", platform):
                needed = max(needed, (int(match[1]), int(match[2])))
            elif (legacy := platform.split("_")[0]) in _MANYLINUX_LEGACY:
                needed = max(needed, _MANYLINUX_LEGACY[legacy])
    return needed


def build_release(stage: Path, project: Path, version: str, *, python: str, cache: Path) -> Release:
    """Build release `version` of `project` under the staging root `stage`.

    `cache` holds the build's own virtual environment and the wheels; it may be
    kept between builds (dependencies found there are not downloaded again).
    """
    interpreter, python_version = target_python(python)
    final = PREFIX / "releases" / version
    release = stage / final.relative_to("/")
    builder = _builder(interpreter, cache / "builder")
    _wheels(builder, project, cache / "wheels")
    _install(builder, interpreter, release, cache / "wheels", version)
    _relocate(release, final)
    _compile(release, stage)
    _strip(release)
    return Release(release, final, python_version, _glibc_needed(release))


def leftovers(stage: Path, build_paths: Sequence[Path]) -> list[str]:
    """Files under `stage` that still mention a build directory."""
    needles = [os.fsencode(p) for p in build_paths]
    found = []
    for path in sorted(stage.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append("/" + str(path.relative_to(stage)))
    return found
