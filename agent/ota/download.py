"""The fetcher interface for over-the-air updates and the download loop both fetchers share.

`Fetcher` is tuf's `FetcherInterface` (`_fetch` for metadata) plus `download` for a bundle.
A fetcher (agent.ota.fetch_https over HTTPS, agent.ota.fetch.LocalFetcher from a directory)
only says how to open "the bytes of a URL from an offset on" (`_open`, a `Body`); the loop
here makes that a bounded, resumable download into a persistent partial file.

Trust: nothing read here is trusted, only bounded. A bundle is bounded by the length its
signed targets metadata gives: never a byte more is written to disk, and a source that sends
more (or announces more) loses its partial file. Metadata chunks are bounded by ngclient's
`download_bytes` (its max_length) and here by a whole-file deadline. Whether the bytes are
right is decided later by agent.ota.trust (signatures, hashes).

Resumption: `download` appends to the partial file (the fetcher asks from its size on), so a
download cut by a reboot or a lost link continues where it stopped. `attempts` counts attempts
in a row that brought no new byte; the whole download is bounded by `timeout_s` in any case.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from agent.backoff import Backoff
from agent.durable import fsync_directory

__all__ = ["Body", "DownloadLimits", "FetchError", "Fetcher", "Retryable", "metadata_chunks"]


class FetchError(Exception):
    """A download failed (network, server, disk or a bound); the message says what to do."""


class _Discard(FetchError):
    """A failure after which the partial file must not be kept (over-length, disk full)."""


class Retryable(Exception):
    """A transient failure: the link broke or stalled, or the server was busy."""

    def __init__(self, message: str, *, restart: bool = False) -> None:
        super().__init__(message)
        self.restart = restart  # the partial file does not fit the source: start from zero


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds of one `download` call."""

    timeout_s: float = 1800.0  # the whole download, retries and back-off included
    stall_s: float = 60.0  # no byte for this long: the attempt failed
    attempts: int = 5  # attempts in a row that bring no new byte, then give up
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    chunk: int = 64 * 1024


@dataclass
class Body:
    """The source's answer to "bytes from offset on"."""

    start: int  # offset of the first byte of `chunks`: the one asked for, or 0 to start over
    total: int | None  # size of the whole file, when the source says
    chunks: Iterator[bytes]
    close: Callable[[], None]


class Fetcher(FetcherInterface):
    """A source of update files: `_fetch` serves TUF metadata, `download` a bundle."""

    def _open(self, url: str, offset: int, stall_s: float, chunk: int) -> Body:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; the fetcher stays usable."""

    def download(
        self, url: str, partial: Path, length: int, limits: DownloadLimits | None = None
    ) -> Path:
        """Complete `partial` to the `length` bytes of `url`, fsync it and return it.

        Never writes more than `length` bytes. Kept for the next call on a timeout or after
        the attempts; removed when the source sends too much or the disk is full.
        """
        limits = limits or DownloadLimits()
        job = _Job(url, length, limits, time.monotonic() + limits.timeout_s)
        try:
            with _open_partial(partial) as file:
                self._download_into(file, job)
                file.flush()
                os.fsync(file.fileno())
            fsync_directory(partial.parent)
        except _Discard:
            partial.unlink(missing_ok=True)
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                partial.unlink(missing_ok=True)
                raise FetchError(
                    f"disk full while downloading {url} into {partial}: it needs {length} bytes;"
                    f" free space under {partial.parent} and try again"
                ) from exc
            raise FetchError(f"cannot write {partial}: {exc.strerror}") from exc
        return partial

    def _download_into(self, file: BinaryIO, job: _Job) -> None:
        limits = job.limits
        backoff, rand = Backoff(limits.backoff_initial_s, limits.backoff_max_s), random.Random()
        failures = best = 0
        while True:
            size = file.seek(0, os.SEEK_END)
            if size > job.length:  # not from this source's file: start over
                file.truncate(0)
                size = 0
            if size == job.length:
                return
            try:
                self._attempt(file, job, size)
                return
            except Retryable as exc:
                if exc.restart:
                    file.truncate(0)
                reached = file.seek(0, os.SEEK_END)
                failures = 0 if reached > best else failures + 1
                best = max(best, reached)
                if failures >= limits.attempts:
                    raise FetchError(
                        f"{job.url}: gave up after {failures} attempts without progress ({exc});"
                        f" {reached} of {job.length} bytes kept in the partial file for next time"
                    ) from exc
                delay = backoff.delay(failures, rand)
                job.check_deadline(reached, delay)
                time.sleep(delay)

    def _attempt(self, file: BinaryIO, job: _Job, offset: int) -> None:
        job.check_deadline(offset)
        stall_s = min(job.limits.stall_s, job.deadline - time.monotonic())
        body = self._open(job.url, offset, stall_s, job.limits.chunk)
        try:
            _check_total(job.url, body.total, job.length)
            file.seek(body.start)
            file.truncate()
            position = body.start
            for chunk in body.chunks:
                if position + len(chunk) > job.length:
                    raise _Discard(_too_long(job.url, job.length))
                file.write(chunk)
                position += len(chunk)
                job.check_deadline(position)
            if position < job.length:
                raise Retryable(f"the transfer ended after {position} of {job.length} bytes")
        finally:
            body.close()


@dataclass(frozen=True)
class _Job:
    """One `download` call: what, how much, and until when."""

    url: str
    length: int
    limits: DownloadLimits
    deadline: float  # time.monotonic()

    def check_deadline(self, done: int, wait: float = 0.0) -> None:
        if time.monotonic() + wait > self.deadline:
            raise FetchError(
                f"{self.url}: not downloaded within {self.limits.timeout_s:g} s"
                f" ({done} of {self.length} bytes); the partial file is kept and the next"
                " try resumes it"
            )


def _too_long(url: str, length: int) -> str:
    return (
        f"{url} sent more than the {length} bytes its signed metadata allows;"
        " the partial download was removed (the repository or a machine in between is faulty)"
    )


def _check_total(url: str, total: int | None, length: int) -> None:
    if total is None or total == length:
        return
    if total > length:
        raise _Discard(_too_long(url, length))
    raise FetchError(
        f"{url} has {total} bytes but its signed metadata says {length}:"
        " the repository is inconsistent; publish it again"
    )


def _open_partial(partial: Path) -> BinaryIO:
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "r+b")


def metadata_chunks(
    url: str, chunks: Iterator[bytes], deadline: float, close: Callable[[], None]
) -> Iterator[bytes]:
    """Metadata chunks with tuf's errors; ngclient's download_bytes bounds their total length."""
    try:
        for chunk in chunks:
            yield chunk
            if time.monotonic() > deadline:
                raise tuf_errors.SlowRetrievalError(f"{url}: took too long")
    except Retryable as exc:
        raise tuf_errors.SlowRetrievalError(f"{url}: {exc}") from exc
    except FetchError as exc:
        raise tuf_errors.DownloadError(str(exc)) from exc
    finally:
        close()
