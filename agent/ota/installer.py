"""Making one release directory: a venv, the bundle's pip, bytecode, run as child processes.

`build` fills `releases/.<version>.partial` (agent.ota.release owns the layout, the lock
and the rename to `releases/<version>`): a venv made by the base interpreter
(`base_python`: never a venv's own python, so a release does not depend on the release
that installed it) without pip, then the bundle's own pip wheel, run as
`python pip.whl/pip install`, installs the hash-pinned requirements from the bundle's
wheels only (no index, no config files, no cache, binaries only). The scripts are
rewritten for the final path, the bytecode compiled under it, and the marker
`.citygate-release.json` written as the last file. `check_compatible` refuses a bundle
built for another Python or another machine before any of that.

Every child (`run`) runs in its own session with stdin closed, cwd /, a clean environment
(`clean_env`: no PYTHON*, PIP_*, VIRTUAL_ENV, so a child python or pip never looks outside
the release; the installer also gets PIP_CONFIG_FILE=/dev/null and PIP_NO_INDEX) and a
deadline; on the deadline its whole process group is SIGKILLed. Only its exit status and
the tail of its output are kept. The install lock's descriptor is handed to the installer
steps, so an installer orphaned by a kill keeps the lock until it ends.

Trust: the unpacked bundle was verified by agent.ota.bundle against a manifest signed
through TUF; pip's --require-hashes checks every wheel again against requirements.txt.
The base interpreter is trusted. What a child prints is shown, never parsed, except the
`major.minor` a given interpreter reports about itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from packaging.utils import canonicalize_version

from agent.ota.bundle import REQUIREMENTS, WHEELS, Manifest, platform_tag

__all__ = ["MARKER", "ReleaseError", "base_python", "build", "check_compatible", "clean_env", "run"]

MARKER = ".citygate-release.json"
_TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024
#: environment variables that would make a child python or pip look outside the release
_UNSAFE_ENV_PREFIXES = ("PYTHON", "PIP_", "VIRTUAL_ENV", "__PYVENV")


class ReleaseError(Exception):
    """A release cannot be installed, found or switched to; the message says what to do."""


def base_python() -> Path:
    """The base interpreter of the running one: never a venv's python, even in a release.

    `sys._base_executable` names it; when it still lies in a venv (a `python`
    missing from the base directory), the `home` of that venv's pyvenv.cfg is used.
    """
    candidate = Path(getattr(sys, "_base_executable", "") or sys.executable)
    for _ in range(4):  # venvs made from venvs, at most a few levels
        config = candidate.parent.parent / "pyvenv.cfg"
        if not config.is_file():
            return candidate
        home = _venv_home(config)
        minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
        names = (candidate.name, minor, f"python{sys.version_info.major}")
        found = [home / name for name in names if (home / name).is_file()]
        if not found:
            raise ReleaseError(f"{config}: home {home} holds no {minor}; repair or rebuild it")
        candidate = found[0]
    raise ReleaseError(f"{candidate}: too many nested virtual environments")


def _venv_home(config: Path) -> Path:
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip())
    raise ReleaseError(f"{config} has no 'home' line; the venv is broken, rebuild it")


def check_compatible(manifest: Manifest, python: Path | None, timeout_s: float) -> None:
    """Refuse a release built for another Python minor version or another machine."""
    interpreter = python or Path(sys.executable)
    if python is None:
        have = f"{sys.version_info.major}.{sys.version_info.minor}"
    else:
        code, out = run(
            [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            timeout_s=min(timeout_s, 30.0),
            env=clean_env(),
        )
        if code != 0:
            raise ReleaseError(f"{interpreter} does not run (exit {code}): {out}")
        have = out.strip()
    if manifest.python != have:
        raise ReleaseError(
            f"release {manifest.version} is built for Python {manifest.python}, but {interpreter} "
            f"is Python {have}: publish a bundle built for Python {have}"
        )
    if manifest.platform != platform_tag():
        raise ReleaseError(
            f"release {manifest.version} is built for {manifest.platform}, this gateway is "
            f"{platform_tag()}: publish a bundle for {platform_tag()}"
        )


def build(
    partial: Path, final: Path, unpacked: Path, manifest: Manifest, *, interpreter: Path,
    deadline: float, lock_fd: int,
) -> None:  # fmt: skip
    """Make the complete release in `partial`, with every path already naming `final`."""
    python = str(partial / "bin/python")
    venv = [str(interpreter), "-m", "venv", "--without-pip",
            "--prompt", f"citygate-{manifest.version}", str(partial)]  # fmt: skip
    _step("create the venv", venv, deadline, lock_fd)
    _step("pip install", [python, *_pip_install(unpacked, manifest)], deadline, lock_fd)
    _check_installed(partial, manifest)
    _relocate(partial, final)
    compile_all = [python, "-m", "compileall", "-q", "-j", "0",
                   "-s", str(partial), "-p", str(final), str(partial / "lib")]  # fmt: skip
    _step("compile the bytecode", compile_all, deadline, lock_fd)
    _write_marker(partial, manifest)


def _pip_install(unpacked: Path, manifest: Manifest) -> list[str]:
    """pip from the bundle's own wheel: its wheels only, every one pinned by hash."""
    wheels = unpacked / WHEELS
    return [
        str(wheels / manifest.installer / "pip"), "install",
        "--no-index", "--find-links", str(wheels), "--only-binary", ":all:",
        "--require-hashes", "-r", str(unpacked / REQUIREMENTS),
        "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--no-compile",
        "--no-warn-script-location", "--progress-bar", "off",
    ]  # fmt: skip


def _step(what: str, args: Sequence[str], deadline: float, lock_fd: int) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ReleaseError(f"install timed out before it could {what}")
    code, tail = run(args, timeout_s=left, env=_pip_env(), pass_fds=(lock_fd,))
    if code is None:
        raise ReleaseError(f"{what} timed out (install time limit reached):\n{tail}")
    if code != 0:
        raise ReleaseError(f"{what} failed (exit {code}):\n{tail}")


def _check_installed(partial: Path, manifest: Manifest) -> None:
    """The bundle installed citygate of the manifest's version, with its command."""
    found = [
        path.name.removesuffix(".dist-info").partition("-")[2]
        for path in partial.glob("lib/python*/site-packages/citygate-*.dist-info")
    ]
    if [canonicalize_version(v) for v in found] != [canonicalize_version(manifest.version)]:
        raise ReleaseError(
            f"bundle {manifest.version} installed citygate {', '.join(found) or 'not at all'}: "
            "its manifest and its citygate wheel disagree; rebuild the bundle"
        )
    if not (partial / "bin/citygate").is_file():
        raise ReleaseError(
            f"bundle {manifest.version} installed no bin/citygate: its citygate wheel lacks "
            "the console script; rebuild the bundle"
        )


def _relocate(partial: Path, final: Path) -> None:
    """Make the scripts and pyvenv.cfg name the final directory instead of the partial one."""
    old, new = os.fsencode(partial), os.fsencode(final)
    for path in [*(partial / "bin").iterdir(), partial / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))


def _write_marker(partial: Path, manifest: Manifest) -> None:
    document = {
        "version": manifest.version,
        "installed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": manifest.python,
        "platform": manifest.platform,
        "created": manifest.created,
        "wheels": {w.file: w.sha256 for w in manifest.wheels},
    }
    (partial / MARKER).write_text(json.dumps(document, indent=2) + "\n")


def run(
    args: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str],
    pass_fds: Sequence[int] = (),
) -> tuple[int | None, str]:
    """Run a program in its own session: (exit status or None on timeout, end of its output)."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd="/",
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except OSError as exc:
            raise ReleaseError(f"cannot run {args[0]}: {exc.strerror or exc}") from exc
        code: int | None
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return code, _tail(out)


def _tail(out: IO[bytes]) -> str:
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - _TAIL_BYTES))
    lines = out.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def clean_env() -> dict[str, str]:
    """This process's environment without what would point a child python elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_UNSAFE_ENV_PREFIXES)}


def _pip_env() -> dict[str, str]:
    """A clean environment for the installer: no pip config files, no index, ever."""
    return {**clean_env(), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}
