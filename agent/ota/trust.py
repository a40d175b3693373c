"""What to install: the gateway's TUF client over the citygate update repository.

`UpdateRepository` wraps python-tuf's ngclient `Updater` (pinned 7.0.1). It trusts exactly
one thing it did not check itself: the root metadata shipped with the gateway
(`trusted_root`), and only until it has a cached root of its own; from then on the cached
root (reached from the shipped one by a chain of signed roots) is the anchor, so an old
shipped root whose keys were later revoked cannot be used to start over. Everything fetched
from the repository is unverified until the Updater accepts it: signatures by a threshold of
the keys root names, versions never going back (against the cached metadata), expiry
against the wall clock, snapshot/timestamp hashes binding every file to one repository
state. Cached metadata is written atomically and fsynced, so a power cut cannot leave a
torn file or roll the cache back.

A bundle's bytes are trusted only after `download` checked its length and sha256 against
the signed targets metadata. The custom data of a target (version, platform, hardware,
channel, min_version) is signed by the targets key; agent.ota.choice decides on it without
I/O (its names are re-exported here).

The wall clock: expiry checks are only as good as the clock. `refresh` refuses a clock
below `agent.clock.BUILD_FLOOR` (a gateway booted without a real-time clock reads 1970, and
every expired, frozen repository would look fresh); a clock that is wrong but after the
floor is the flow's business (it waits for `agent.clock` to trust the wall clock).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from tuf.api import exceptions
from tuf.api._payload import Targets  # tuf.api.metadata re-exports it implicitly
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from agent.clock import BUILD_FLOOR
from agent.durable import fsync_directory, write_atomically
from agent.ota.choice import PRODUCT, Candidate, choose, parse_candidates
from agent.ota.fetch import DownloadLimits, Fetcher, FetchError

__all__ = [
    "MAX_METADATA_BYTES",
    "PRODUCT",
    "Candidate",
    "TrustError",
    "UpdateRepository",
    "choose",
    "parse_candidates",
]

#: largest root, snapshot or targets file accepted (the timestamp is at most 16 KiB)
MAX_METADATA_BYTES: Final = 2 * 1024 * 1024
_TIMESTAMP_BYTES: Final = 16 * 1024


class TrustError(Exception):
    """The repository could not be trusted or reached; the message says which role and why.

    `retryable` is True when nothing is wrong with the data itself (a download failed, the
    clock is not trusted yet, the disk is full): try again later. False means the repository
    served something that failed verification: a security failure, never retried silently.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class _DurableUpdater(Updater):
    """ngclient's Updater, crash-safe: 7.0.1 neither fsyncs nor replaces root.json atomically."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        write_atomically(Path(filename), data, 0o640)

    def _update_root_symlink(self) -> None:
        link = os.path.join(self._dir, "root.json")
        current = os.path.join("root_history", f"{self._trusted_set.root.version}.root.json")
        tmp = f"{link}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(current, tmp)
        os.replace(tmp, link)
        fsync_directory(self._dir)

    def trusted_targets(self) -> Targets:
        """The top-level targets metadata the last refresh verified."""
        return self._trusted_set.targets

    def consistent_snapshot(self) -> bool:
        """Whether the trusted root asks for hash-prefixed target names."""
        return bool(self._trusted_set.root.consistent_snapshot)


#: how a verification failure reads (most specific first); every one is a security failure
_VERDICTS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (
        exceptions.ExpiredMetadataError,
        "has expired: the repository stopped re-signing (run `python -m images.repo sign`) or "
        "someone replays a frozen copy; check the gateway clock too",
    ),
    (
        exceptions.UnsignedMetadataError,
        "is not signed by enough trusted keys: not installing anything; the repository or its "
        "mirror is compromised or misconfigured",
    ),
    (
        exceptions.BadVersionNumberError,
        "is older than what this gateway already trusts: a replay or rollback; not installing "
        "anything",
    ),
    (
        exceptions.LengthOrHashMismatchError,
        "does not match the version and hashes the repository signed for it: files of "
        "different repository states are mixed (mix-and-match) or the mirror is corrupt",
    ),
    (exceptions.RepositoryError, "is invalid"),
)


class UpdateRepository:
    """The update repository as this gateway trusts it; each `refresh` is a new check."""

    def __init__(
        self,
        metadata_dir: Path,
        trusted_root: Path,
        fetcher: Fetcher,
        metadata_url: str,
        targets_url: str,
        *,
        max_metadata_bytes: int = MAX_METADATA_BYTES,
    ) -> None:
        self._dir = metadata_dir
        self._trusted_root = trusted_root
        self._fetcher = fetcher
        self._metadata_url = metadata_url
        self._targets_url = targets_url if targets_url.endswith("/") else f"{targets_url}/"
        self._config = UpdaterConfig(
            root_max_length=max_metadata_bytes,
            timestamp_max_length=min(max_metadata_bytes, _TIMESTAMP_BYTES),
            snapshot_max_length=max_metadata_bytes,
            targets_max_length=max_metadata_bytes,
        )
        self._updater: _DurableUpdater | None = None

    def refresh(self) -> None:
        """Fetch and verify root, timestamp, snapshot and targets (TrustError on any failure)."""
        if time.time() < BUILD_FLOOR:
            moment = datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds")
            raise TrustError(
                f"the wall clock reads {moment}, before this software was built: expiry cannot "
                "be checked; waiting for a trusted clock",
                retryable=True,
            )
        self._updater = None
        updater = self._open()
        steps: tuple[tuple[str, Callable[[], object]], ...] = (
            ("root", updater._load_root),
            ("timestamp", updater._load_timestamp),
            ("snapshot", updater._load_snapshot),
            ("targets", lambda: updater._load_targets("targets", "root")),
        )
        for role, step in steps:
            try:
                step()
            except (
                exceptions.RepositoryError,
                exceptions.DownloadError,
                FetchError,
                OSError,
            ) as exc:
                raise self._error(role, exc) from exc
        self._updater = updater

    def _open(self) -> _DurableUpdater:
        self._dir.mkdir(parents=True, exist_ok=True)
        cached = self._dir / "root.json"
        anchor = cached if cached.exists() else self._trusted_root
        try:
            bootstrap = anchor.read_bytes()
        except OSError as exc:
            raise TrustError(
                f"cannot read the trusted root {anchor}: {exc}; reinstall the package shipping it",
                retryable=False,
            ) from exc
        try:
            return _DurableUpdater(
                str(self._dir),
                self._metadata_url,
                target_base_url=self._targets_url,
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=bootstrap,
            )
        except (exceptions.RepositoryError, ValueError) as exc:
            raise TrustError(
                f"root: {anchor} is not valid root metadata ({exc}); if it is the cache, remove "
                f"{self._dir} to start again from {self._trusted_root}",
            ) from exc
        except OSError as exc:
            raise TrustError(f"root: cannot write {self._dir}: {exc}", retryable=True) from exc

    def _error(self, role: str, exc: Exception) -> TrustError:
        if isinstance(exc, OSError):
            return TrustError(f"{role}: cannot write {self._dir}: {exc}", retryable=True)
        for kind, verdict in _VERDICTS:
            if isinstance(exc, kind):
                return TrustError(f"{role}: metadata from {self._metadata_url} {verdict}: {exc}")
        return TrustError(
            f"{role}: could not download metadata from {self._metadata_url}: {exc}; "
            "try again later",
            retryable=True,
        )

    def candidates(self) -> list[Candidate]:
        """Every citygate bundle the verified targets metadata offers (refreshes if needed)."""
        return self._parsed()[0]

    def _refreshed(self) -> _DurableUpdater:
        if self._updater is None:
            self.refresh()
        if self._updater is None:  # pragma: no cover - refresh either sets it or raises
            raise TrustError("targets: no verified metadata; call refresh first")
        return self._updater

    def _parsed(self) -> tuple[list[Candidate], list[str]]:
        return parse_candidates(self._refreshed().trusted_targets().targets)

    def choose(
        self,
        installed: str,
        *,
        platform: str,
        python: str,
        hardware: str,
        channel: str,
        refused: frozenset[str] = frozenset(),
    ) -> tuple[Candidate | None, list[str]]:
        """The bundle to install (see `choose`), and why every other target was skipped."""
        found, invalid = self._parsed()
        best, skipped = choose(
            found,
            installed,
            platform=platform,
            python=python,
            hardware=hardware,
            channel=channel,
            refused=refused,
        )
        return best, invalid + skipped

    def target_url(self, cand: Candidate) -> str:
        """Where the bundle's bytes are (hash-prefixed under consistent snapshots)."""
        name = cand.name
        if self._refreshed().consistent_snapshot():
            dirname, sep, base = name.rpartition("/")
            name = f"{dirname}{sep}{next(iter(cand.target.hashes.values()))}.{base}"
        return f"{self._targets_url}{name}"

    def download(
        self, cand: Candidate, partial_dir: Path, dest: Path, limits: DownloadLimits
    ) -> Path:
        """Download (resuming partial_dir/<name>.part), verify against the signed hashes, move.

        On a mismatch the partial file is removed and TrustError raised; on success `dest`
        holds the verified bundle (fsynced) and is returned.
        """
        url = self.target_url(cand)
        partial_dir.mkdir(parents=True, exist_ok=True)
        partial = partial_dir / f"{cand.name}.part"
        try:
            self._fetcher.download(url, partial, cand.length, limits)
        except FetchError as exc:
            raise TrustError(
                f"{cand.name}: download from {url} failed: {exc}; the next attempt resumes",
                retryable=True,
            ) from exc
        try:
            with partial.open("rb") as data:
                cand.target.verify_length_and_hashes(data)
                os.fsync(data.fileno())
        except exceptions.LengthOrHashMismatchError as exc:
            partial.unlink(missing_ok=True)
            raise TrustError(
                f"{cand.name}: the bytes from {url} do not match its signed hashes ({exc}); "
                "removed them: the mirror or the network altered the bundle"
            ) from exc
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, dest)
        fsync_directory(dest.parent)
        if dest.parent != partial_dir:
            fsync_directory(partial_dir)
        return dest
