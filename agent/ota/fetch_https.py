"""The HTTPS fetcher for over-the-air updates: TUF metadata and bundles from a repository server.

`HttpsFetcher` is a `Fetcher` (agent.ota.download) over urllib3 with this module's own TLS
context. A bundle is asked for from the partial file's size on (HTTP Range); the answer's
status line and Content-Range say where the body starts, so a server that ignores the range
is followed from zero and one that answers another range is refused.

Trust: nothing fetched here is trusted, only bounded (agent.ota.download; ngclient's
max_length for metadata). TLS authenticates the server (the configured CA file, else the
system store; host name checked; TLS 1.2 or newer) and presents the gateway's client
certificate when the server asks, so a private repository can tell gateways from strangers.
Plain http is refused: TUF would still catch tampering, but an observer would learn what and
when we update, and a client certificate would travel for nothing. Redirects are not
followed and proxy variables from the environment are not used.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from tuf.api import exceptions as tuf_errors

from agent.ota.download import Body, Fetcher, FetchError, Retryable, metadata_chunks

__all__ = ["HttpsFetcher"]

_USER_AGENT = "citygate-ota"
_BUSY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


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
        except (FetchError, Retryable) as exc:
            raise tuf_errors.DownloadError(str(exc)) from exc
        if response.status != 200:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        deadline = time.monotonic() + self._metadata_timeout_s
        chunks = _read(response, 64 * 1024, self._timeout_s)
        return metadata_chunks(url, chunks, deadline, lambda: _finish(response))

    def _open(self, url: str, offset: int, stall_s: float, chunk: int) -> Body:
        response = self._request(url, {"Range": f"bytes={offset}-"} if offset else {}, stall_s)
        try:
            start, total = _range_of(url, response, offset)
        except BaseException:
            response.close()
            raise
        return Body(start, total, _read(response, chunk, stall_s), lambda: _finish(response))

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
            raise Retryable(f"cannot reach {host}: {exc}") from exc

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
        raise Retryable(f"the server has fewer than {offset} bytes (HTTP 416)", restart=True)
    if status in _BUSY_STATUS:
        raise Retryable(f"the server answered HTTP {status}")
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
            raise Retryable(f"no data for {stall_s:g} s") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Retryable(f"the connection broke: {exc}") from exc
        if not data:
            return
        yield data


def _finish(response: urllib3.BaseHTTPResponse) -> None:
    response.close()  # a body not read to its end must not be reused for the next request
    response.release_conn()
