"""Releases of the agent under one root: install offline, self-test, switch, commit, prune.

    <root>/releases/<version>/   a virtual environment holding that version of citygate
    <root>/current  -> releases/<version>   what the service runs (ExecStart)
    <root>/committed -> releases/<version>  the last release that passed its trial (the guard)

`Releases.install` makes a release from an unpacked bundle (agent.ota.bundle) in
`releases/.<version>.partial`: a venv made by the base interpreter (never a venv's
own python, so a release does not depend on the release that installed it) without
pip, then the bundle's own pip wheel, run as `python pip.whl/pip install`, installs
the hash-pinned requirements from the bundle's wheels only (no index, no config
files, no cache, binaries only). The scripts are rewritten for the final path, the
bytecode compiled under it, the marker `.citygate-release.json` written as the last
file, everything synced, and the directory renamed: `releases/<version>` exists only
when complete. A kill at any point leaves at most a dot-named leftover, removed by
the next install or prune. The lock `<root>/.install.lock` is held for the whole
install and handed to the installer processes, so an installer orphaned by a kill
keeps it until it ends, and nobody rebuilds the directory under it.

Links are swapped atomically (a new relative symlink renamed over the old one, the
directory fsynced): a reader sees the old release or the new one, never neither.

Trust: the unpacked bundle was verified by agent.ota.bundle against a manifest
signed through TUF; pip's --require-hashes checks every wheel again against
requirements.txt. The root directory and the base interpreter are trusted. A
release's own `bin/citygate selftest` is run with a timeout and only its exit
status counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from packaging.utils import canonicalize_version
from packaging.version import InvalidVersion, Version

from agent.ota.bundle import REQUIREMENTS, WHEELS, Manifest, platform_tag

log = logging.getLogger(__name__)

MARKER = ".citygate-release.json"
RELEASES = "releases"
CURRENT = "current"
COMMITTED = "committed"
_LOCK = ".install.lock"
_TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024
_LOCK_POLL_S = 0.1
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


class Releases:
    """The releases under `root` and its `current` and `committed` links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / RELEASES

    # --- reading ---------------------------------------------------------------

    def path(self, version: str) -> Path:
        """releases/<version>; ReleaseError for a version that is not in PEP 440 normal form."""
        try:
            normal = str(Version(version))
        except InvalidVersion:
            normal = ""
        if normal != version:
            raise ReleaseError(f"release version {version!r} is not a normalised PEP 440 version")
        return self.releases / version

    def installed(self) -> list[str]:
        """Complete releases (OTA-installed or from the Debian package), oldest first."""
        if not self.releases.is_dir():
            return []
        found = []
        for entry in self.releases.iterdir():
            if entry.name.startswith(".") or not (entry / "bin/citygate").exists():
                continue
            with contextlib.suppress(InvalidVersion):
                found.append((Version(entry.name), entry.name))
        return [name for _, name in sorted(found)]

    def current(self) -> str | None:
        """The version `current` points to, None when it is missing or dangling."""
        return self._target(CURRENT)

    def committed(self) -> str | None:
        """The version `committed` points to, None when it is missing or dangling."""
        return self._target(COMMITTED)

    def _target(self, link: str) -> str | None:
        try:
            target = Path(os.readlink(self.root / link))
        except OSError:
            return None
        if not target.is_absolute():
            target = self.root / target
        if target.parent != self.releases or not target.is_dir():
            return None
        return target.name

    # --- installing ------------------------------------------------------------

    def install(
        self,
        unpacked: Path,
        manifest: Manifest,
        *,
        python: Path | None = None,
        timeout_s: float = 900.0,
    ) -> Path:
        """Install the unpacked bundle as releases/<version>; reuse it if already complete."""
        final = self.path(manifest.version)
        interpreter = python or base_python()
        _check_compatible(manifest, python, timeout_s)
        deadline = time.monotonic() + timeout_s
        self.releases.mkdir(parents=True, exist_ok=True)
        with self._locked(deadline) as lock_fd:
            if (final / "bin/citygate").exists():
                log.info("release %s is already installed in %s", manifest.version, final)
                return final
            partial = self.releases / f".{manifest.version}.partial"
            _remove(partial)
            try:
                _build(
                    partial, final, unpacked, manifest,
                    interpreter=interpreter, deadline=deadline, lock_fd=lock_fd,
                )  # fmt: skip
                os.sync()  # one sync of the file system instead of thousands of fsyncs
                os.rename(partial, final)
            except BaseException:
                _remove(partial)
                raise
            _fsync_dir(self.releases)
        log.info("installed release %s in %s", manifest.version, final)
        return final

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[int]:
        self.releases.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ReleaseError(
                            f"{self.root / _LOCK} is held by another install (perhaps an "
                            "installer left by a killed agent); try again when it has ended"
                        ) from None
                    time.sleep(_LOCK_POLL_S)
            yield fd
        finally:
            os.close(fd)

    # --- testing ---------------------------------------------------------------

    def selftest(
        self, version: str, *, config: Path | None, timeout_s: float = 120.0
    ) -> tuple[bool, str]:
        """Run the release's own `citygate selftest`; (passed, the last lines of its output)."""
        program = self.path(version) / "bin/citygate"
        if not program.exists():
            return False, f"release {version} is not installed ({program} is missing)"
        args = [str(program), "selftest"]
        if config is not None:
            args += ["--config", str(config)]
        try:
            # unbuffered: the lines of a selftest that hangs are shown too
            env = {**_clean_env(), "PYTHONUNBUFFERED": "1"}
            code, tail = _run(args, timeout_s=timeout_s, env=env)
        except ReleaseError as exc:
            return False, str(exc)
        if code is None:
            return False, f"{tail}\nselftest of {version} timed out after {timeout_s:g} s"
        return code == 0, tail

    # --- links -----------------------------------------------------------------

    def switch(self, version: str) -> None:
        """Point `current` at an installed release, atomically."""
        self._link(CURRENT, version)

    def commit(self, version: str) -> None:
        """Point `committed` at `version`, then prune all but current, committed and one more."""
        self._link(COMMITTED, version)
        installed = self.installed()
        keep = {version, *filter(None, [self.current()])}
        older = [v for v in installed if Version(v) < Version(version) and v not in keep]
        if older:
            keep.add(older[-1])
        try:
            self.prune(keep)
        except (ReleaseError, OSError) as exc:  # committed is what matters; prune next time
            log.warning("committed %s, but could not prune old releases: %s", version, exc)

    def adopt(self) -> None:
        """If there is no `committed` link yet (a Debian install), make it equal to `current`."""
        if (self.root / COMMITTED).is_symlink():
            return
        version = self.current()
        if version is not None:
            self._link(COMMITTED, version)

    def _link(self, name: str, version: str) -> None:
        target = self.path(version)
        if not (target / "bin/citygate").exists():
            raise ReleaseError(f"release {version} is not installed in {self.releases}")
        temporary = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
        os.symlink(f"{RELEASES}/{version}", temporary)
        try:
            os.replace(temporary, self.root / name)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def prune(self, keep: set[str]) -> list[str]:
        """Remove releases not in `keep` (current and committed are always kept) and leftovers.

        Returns the versions removed. Dot-named leftovers of killed installs and
        link swaps go too. Holds the install lock, so an install is never pruned.
        """
        keep = keep | {v for v in (self.current(), self.committed()) if v is not None}
        removed = []
        with self._locked(time.monotonic() + 10.0):
            for version in self.installed():
                if version not in keep:
                    try:
                        _discard(self.releases / version)
                    except OSError as exc:  # e.g. the Debian package's root-owned release
                        log.warning("cannot remove release %s: %s", version, exc)
                        continue
                    removed.append(version)
            for entry in self.releases.iterdir():
                if entry.name.startswith("."):
                    _remove(entry)
        for entry in self.root.glob(".*.tmp"):
            if entry.is_symlink():
                entry.unlink(missing_ok=True)
        _fsync_dir(self.releases)
        return removed


def _check_compatible(manifest: Manifest, python: Path | None, timeout_s: float) -> None:
    """Refuse a release built for another Python minor version or another machine."""
    interpreter = python or Path(sys.executable)
    if python is None:
        have = f"{sys.version_info.major}.{sys.version_info.minor}"
    else:
        code, out = _run(
            [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            timeout_s=min(timeout_s, 30.0),
            env=_clean_env(),
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


def _build(
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
    code, tail = _run(args, timeout_s=left, env=_pip_env(), pass_fds=(lock_fd,))
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


def _run(
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


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point a child python elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_UNSAFE_ENV_PREFIXES)}


def _pip_env() -> dict[str, str]:
    """A clean environment for the installer: no pip config files, no index, ever."""
    return {**_clean_env(), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}


def _discard(release: Path) -> None:
    """Remove a release: first renamed to a dot name (gone at once), then deleted."""
    leftover = release.with_name(f".{release.name}.{secrets.token_hex(4)}.removing")
    os.rename(release, leftover)
    _fsync_dir(release.parent)
    _remove(leftover)


def _remove(path: Path) -> None:
    """Remove a directory, link or file if present (a release or a leftover)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
