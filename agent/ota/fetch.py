"""Transport for over-the-air updates: TUF metadata and bundles over HTTPS or from a directory.

Two fetchers share one interface, tuf's `FetcherInterface` (`_fetch` for metadata) plus
`download` for a bundle: `HttpsFetcher` talks to a repository server, `LocalFetcher` reads a
directory such as a USB stick. `fetcher_for` picks one from the configured repository.

Trust: nothing fetched here is trusted, only bounded. Metadata is bounded by the max_length
ngclient gives `download_bytes`; a bundle by the length its signed targets metadata gives
(never a byte more is written to disk). Whether the bytes are right is decided later by
`agent.ota.trust` (signatures, hashes). TLS authenticates the server (the configured CA file,
else the system store; host name checked; TLS 1.2 or newer) and presents the gateway's client
certificate when the server asks, so a private repository can tell gateways from strangers.
Plain http is refused: TUF would still catch tampering, but an observer would learn what and
when we update, and a client certificate would travel for nothing. Proxy variables from the
environment are not used. A directory is confined to its root after resolving symlinks and
only regular files are read (a FIFO or a device on a stick must not hang or flood us).

Resumption: `download` appends to a persistent partial file (HTTP Range from its size), so a
download cut by a reboot or a lost link continues where it stopped. `attempts` counts attempts
in a row that brought no new byte; the whole download is bounded by `timeout_s` in any case.
"""

from __future__ import annotations

import errno
import os
import random
import re
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from agent.backoff import Backoff

_USER_AGENT = "citygate-ota"
_BUSY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_LOCAL_METADATA_TIMEOUT_S = 300.0  # a dying stick may read very slowly
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FetchError(Exception):
    """A download failed (network, server, disk or a bound); the message says what to do."""


class _Discard(FetchError):
    """A failure after which the partial file must not be kept (over-length, disk full)."""


class _Retryable(Exception):
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
class _Body:
    """The source's answer to "bytes from offset on"."""

    start: int  # offset of the first byte of `chunks`: the one asked for, or 0 to start over
    total: int | None  # size of the whole file, when the source says
    chunks: Iterator[bytes]
    close: Callable[[], None]


class Fetcher(FetcherInterface):
    """A source of update files: `_fetch` serves TUF metadata, `download` a bundle."""

    def _open(self, url: str, offset: int, stall_s: float, chunk: int) -> _Body:
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
            _fsync_directory(partial.parent)
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
            except _Retryable as exc:
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
                raise _Retryable(f"the transfer ended after {position} of {job.length} bytes")
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


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HttpsFetcher(Fetcher):
    """Files from an HTTPS repository server; urllib3 with this module's own TLS context."""

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        timeout_s: float = 30.0,
        metadata_timeout_s: float = 300.0,
        insecure_http: bool = False,
    ) -> None:
        self._timeout_s = timeout_s  # metadata: connect and stall
        self._metadata_timeout_s = metadata_timeout_s  # metadata: one whole file
        self._insecure_http = insecure_http  # tests only: no TLS at all
        context = _tls_context(ca_file, client_cert, client_key)
        self._pool = urllib3.PoolManager(num_pools=4, ssl_context=context)

    def close(self) -> None:
        self._pool.clear()

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._request(url, {}, self._timeout_s)
        except (FetchError, _Retryable) as exc:
            raise tuf_errors.DownloadError(str(exc)) from exc
        if response.status != 200:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        deadline = time.monotonic() + self._metadata_timeout_s
        chunks = _read(response, 64 * 1024, self._timeout_s)
        return _metadata_chunks(url, chunks, deadline, lambda: _finish(response))

    def _open(self, url: str, offset: int, stall_s: float, chunk: int) -> _Body:
        response = self._request(url, {"Range": f"bytes={offset}-"} if offset else {}, stall_s)
        try:
            start, total = _range_of(url, response, offset)
        except BaseException:
            response.close()
            raise
        return _Body(start, total, _read(response, chunk, stall_s), lambda: _finish(response))

    def _request(
        self, url: str, headers: dict[str, str], stall_s: float
    ) -> urllib3.BaseHTTPResponse:
        self._check_scheme(url)
        host = urlsplit(url).netloc
        try:
            return self._pool.request(
                "GET",
                url,
                headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", **headers},
                preload_content=False,
                decode_content=False,
                retries=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=stall_s, read=stall_s),
            )
        except urllib3.exceptions.SSLError as exc:
            raise FetchError(
                f"TLS with {host} failed ({exc}): check the repository's CA file and host name,"
                " and the gateway's client certificate if the server requires one"
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retryable(f"cannot reach {host}: {exc}") from exc

    def _check_scheme(self, url: str) -> None:
        scheme = urlsplit(url).scheme
        if scheme == "https" or (scheme == "http" and self._insecure_http):
            return
        if scheme == "http":
            raise FetchError(f"refusing insecure {url}: updates are fetched over https:// only")
        raise FetchError(f"{url}: HttpsFetcher fetches https:// URLs only")


def _tls_context(
    ca_file: Path | None, client_cert: Path | None, client_key: Path | None
) -> ssl.SSLContext:
    if (client_cert is None) != (client_key is None):
        raise FetchError("a client certificate needs its key and a key its certificate: give both")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if ca_file is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            context.load_verify_locations(cafile=str(ca_file))
        if client_cert is not None:
            context.load_cert_chain(certfile=str(client_cert), keyfile=str(client_key))
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (ca_file, client_cert, client_key) if p is not None)
        raise FetchError(f"cannot load TLS files ({files}): {exc}") from exc
    return context


def _range_of(url: str, response: urllib3.BaseHTTPResponse, offset: int) -> tuple[int, int | None]:
    """(offset of the body's first byte, size of the whole file or None) from the status line."""
    status = response.status
    if status == 200:
        length = response.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != offset:
            raise FetchError(
                f"{url}: asked for bytes from {offset} on, the server answered"
                f" Content-Range {response.headers.get('Content-Range')!r}; fix the server"
            )
        return offset, None if match[3] == "*" else int(match[3])
    if status == 416:
        raise _Retryable(f"the server has fewer than {offset} bytes (HTTP 416)", restart=True)
    if status in _BUSY_STATUS:
        raise _Retryable(f"the server answered HTTP {status}")
    if 300 <= status < 400:
        raise FetchError(
            f"{url}: redirected to {response.headers.get('Location')!r}; redirects are not"
            " followed: configure the final https:// URL of the repository"
        )
    raise FetchError(f"{url}: HTTP {status}; check the repository URL and the server")


def _read(response: urllib3.BaseHTTPResponse, chunk: int, stall_s: float) -> Iterator[bytes]:
    """The body as it arrives (read1: a slow server cannot hold one read for a whole chunk)."""
    while True:
        try:
            data = response.read1(chunk, decode_content=False)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise _Retryable(f"no data for {stall_s:g} s") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retryable(f"the connection broke: {exc}") from exc
        if not data:
            return
        yield data


def _finish(response: urllib3.BaseHTTPResponse) -> None:
    response.close()  # a body not read to its end must not be reused for the next request
    response.release_conn()


def _metadata_chunks(
    url: str, chunks: Iterator[bytes], deadline: float, close: Callable[[], None]
) -> Iterator[bytes]:
    """Metadata chunks with tuf's errors; ngclient's download_bytes bounds their total length."""
    try:
        for chunk in chunks:
            yield chunk
            if time.monotonic() > deadline:
                raise tuf_errors.SlowRetrievalError(f"{url}: took too long")
    except _Retryable as exc:
        raise tuf_errors.SlowRetrievalError(f"{url}: {exc}") from exc
    except FetchError as exc:
        raise tuf_errors.DownloadError(str(exc)) from exc
    finally:
        close()


class LocalFetcher(Fetcher):
    """Files under a directory (a USB stick); file:// URLs that resolve inside `root` only."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise FetchError(f"repository directory {root} does not exist (is the stick mounted?)")

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            file, _ = self._open_file(url)
        except FileNotFoundError as exc:
            raise tuf_errors.DownloadHTTPError(f"{url}: no such file", 404) from exc
        except (FetchError, OSError) as exc:
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        deadline = time.monotonic() + _LOCAL_METADATA_TIMEOUT_S
        return _metadata_chunks(url, _file_chunks(url, file, 64 * 1024), deadline, file.close)

    def _open(self, url: str, offset: int, stall_s: float, chunk: int) -> _Body:
        try:
            file, size = self._open_file(url)
        except OSError as exc:
            raise FetchError(f"cannot read {url}: {exc.strerror}") from exc
        start = offset if offset <= size else 0
        file.seek(start)
        return _Body(start, size, _file_chunks(url, file, chunk), file.close)

    def _open_file(self, url: str) -> tuple[BinaryIO, int]:
        path = self._path(url)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FetchError(f"{path} is not a regular file: refused")
        return os.fdopen(fd, "rb"), info.st_size

    def _path(self, url: str) -> Path:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise FetchError(f"{url}: a directory repository serves file:/// URLs only")
        path = Path(url2pathname(parts.path)).resolve()
        if not path.is_relative_to(self.root):
            raise FetchError(f"{url} resolves to {path}, outside the repository {self.root}")
        return path


def _file_chunks(url: str, file: BinaryIO, chunk: int) -> Iterator[bytes]:
    with file:
        while True:
            try:
                data = file.read(chunk)
            except OSError as exc:
                raise FetchError(
                    f"cannot read {url}: {exc.strerror} (was the stick removed?)"
                ) from exc
            if not data:
                return
            yield data


def fetcher_for(
    repo: str,
    *,
    ca_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> tuple[Fetcher, str, str]:
    """(fetcher, metadata base URL, targets base URL) for an https:// URL or a directory."""
    parts = urlsplit(repo)
    if parts.scheme == "https" and parts.netloc:
        base = repo.rstrip("/") + "/"
        fetcher = HttpsFetcher(ca_file=ca_file, client_cert=client_cert, client_key=client_key)
        return fetcher, base + "metadata/", base + "targets/"
    if parts.scheme == "http":
        raise FetchError(f"refusing insecure repository {repo}: use https:// or a directory")
    if parts.scheme == "file" or (parts.scheme == "" and repo.startswith("/")):
        local = LocalFetcher(Path(url2pathname(parts.path)) if parts.scheme else Path(repo))
        base = local.root.as_uri().rstrip("/") + "/"
        return local, base + "metadata/", base + "targets/"
    raise FetchError(f"repository {repo!r}: give an https:// URL or an absolute directory path")
