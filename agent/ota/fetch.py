"""Transport for over-the-air updates: TUF metadata and bundles over HTTPS or from a directory.

Two fetchers share one interface, `Fetcher` (agent.ota.download: tuf's `FetcherInterface`
plus a bounded, resumable `download` for a bundle): `HttpsFetcher` (agent.ota.fetch_https)
talks to a repository server, `LocalFetcher` (here) reads a directory such as a USB stick.
`fetcher_for` picks one from the configured repository. The public names of the transport
are all importable from here.

Trust: nothing fetched is trusted, only bounded; whether the bytes are right is decided later
by agent.ota.trust (signatures, hashes). A directory is confined to its root after resolving
symlinks and only regular files are read (a FIFO or a device on a stick must not hang or
flood us). Plain http is refused (agent.ota.fetch_https says why).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from tuf.api import exceptions as tuf_errors

from agent.ota.download import Body, DownloadLimits, Fetcher, FetchError, metadata_chunks
from agent.ota.fetch_https import HttpsFetcher

__all__ = [
    "DownloadLimits",
    "FetchError",
    "Fetcher",
    "HttpsFetcher",
    "LocalFetcher",
    "fetcher_for",
]

_LOCAL_METADATA_TIMEOUT_S = 300.0  # a dying stick may read very slowly


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
        return metadata_chunks(url, _file_chunks(url, file, 64 * 1024), deadline, file.close)

    def _open(self, url: str, offset: int, stall_s: float, chunk: int) -> Body:
        try:
            file, size = self._open_file(url)
        except OSError as exc:
            raise FetchError(f"cannot read {url}: {exc.strerror}") from exc
        start = offset if offset <= size else 0
        file.seek(start)
        return Body(start, size, _file_chunks(url, file, chunk), file.close)

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
