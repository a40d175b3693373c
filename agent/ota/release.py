"""Releases of the agent under one root: install offline, self-test, switch, commit, prune.

    <root>/releases/<version>/   a virtual environment holding that version of citygate
    <root>/current  -> releases/<version>   what the service runs (ExecStart)
    <root>/committed -> releases/<version>  the last release that passed its trial (the guard)

`Releases.install` makes a release from an unpacked bundle (agent.ota.bundle) in
`releases/.<version>.partial` (agent.ota.installer builds it there: a venv of the base
interpreter, the bundle's pip and wheels, the bytecode, the marker `.citygate-release.json`
as the last file), syncs everything and renames the directory: `releases/<version>` exists
only when complete. A kill at any point leaves at most a dot-named leftover, removed by
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
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from packaging.version import InvalidVersion, Version

from agent.durable import fsync_directory
from agent.ota.bundle import Manifest
from agent.ota.installer import (
    MARKER,
    ReleaseError,
    base_python,
    build,
    check_compatible,
    clean_env,
    run,
)

__all__ = [
    "COMMITTED",
    "CURRENT",
    "MARKER",
    "RELEASES",
    "ReleaseError",
    "Releases",
    "base_python",
]

log = logging.getLogger(__name__)

RELEASES = "releases"
CURRENT = "current"
COMMITTED = "committed"
_LOCK = ".install.lock"
_LOCK_POLL_S = 0.1


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
        check_compatible(manifest, python, timeout_s)
        deadline = time.monotonic() + timeout_s
        self.releases.mkdir(parents=True, exist_ok=True)
        with self._locked(deadline) as lock_fd:
            if (final / "bin/citygate").exists():
                log.info("release %s is already installed in %s", manifest.version, final)
                return final
            partial = self.releases / f".{manifest.version}.partial"
            _remove(partial)
            try:
                build(
                    partial, final, unpacked, manifest,
                    interpreter=interpreter, deadline=deadline, lock_fd=lock_fd,
                )  # fmt: skip
                os.sync()  # one sync of the file system instead of thousands of fsyncs
                os.rename(partial, final)
            except BaseException:
                _remove(partial)
                raise
            fsync_directory(self.releases)
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
            env = {**clean_env(), "PYTHONUNBUFFERED": "1"}
            code, tail = run(args, timeout_s=timeout_s, env=env)
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
        fsync_directory(self.root)

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
        fsync_directory(self.releases)
        return removed


def _discard(release: Path) -> None:
    """Remove a release: first renamed to a dot name (gone at once), then deleted."""
    leftover = release.with_name(f".{release.name}.{secrets.token_hex(4)}.removing")
    os.rename(release, leftover)
    fsync_directory(release.parent)
    _remove(leftover)


def _remove(path: Path) -> None:
    """Remove a directory, link or file if present (a release or a leftover)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)
