"""OTA transport: bounded, resumable downloads over mutually authenticated HTTPS or a directory.

Every network test talks to a real threaded HTTPS server on 127.0.0.1 (the session's lab CA
signs its certificate) whose behaviour a `Script` sets: honour Range or not, cut the
connection after some bytes, drip, stay silent, send more than announced. The disk-full test
mounts a real 1 MiB tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_errors

from agent.ota.fetch import (
    DownloadLimits,
    FetchError,
    HttpsFetcher,
    LocalFetcher,
    fetcher_for,
)
from provisioning.labca import load_ca
from provisioning.pki import (
    LabFiles,
    generate_key,
    issue_certificate,
    write_certificate,
    write_private_key,
)

DATA = bytes(range(256)) * 1200  # 307200 bytes, every offset distinguishable mod 256
QUICK = DownloadLimits(timeout_s=20.0, stall_s=2.0, attempts=3, backoff_initial_s=0.05)


@dataclass
class Script:
    """How the server answers, and what it saw."""

    data: bytes = DATA
    honour_range: bool = True
    cut_after: int | None = None  # close the connection after this many body bytes
    drip_s: float | None = None  # send the body one byte per drip_s
    silent: bool = False  # send the headers, then nothing
    endless: bool = False  # no length, bytes until the client leaves
    extra: bytes = b""  # more body than `data`
    send_length: bool = True
    ranges: list[str | None] = field(default_factory=list)
    peers: list[dict[str, Any] | None] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        script = self.server.script
        script.ranges.append(self.headers.get("Range"))
        if isinstance(self.request, ssl.SSLSocket):
            script.peers.append(self.request.getpeercert())
        if self.path.endswith("/missing"):
            self.send_error(404)
            return
        body, start = script.data + script.extra, 0
        requested = self.headers.get("Range")
        if requested and script.honour_range:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if script.send_length and not script.endless:
            self.send_header("Content-Length", str(len(body) - start))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._send_body(script, body[start:])

    def _send_body(self, script: Script, body: bytes) -> None:
        stop = self.server.stop
        if script.silent:
            stop.wait(30)
        elif script.endless:
            while not stop.is_set():
                self.wfile.write(b"\0" * 65536)
        elif script.drip_s is not None:
            for offset in range(len(body)):
                if stop.wait(script.drip_s):
                    break
                self.wfile.write(body[offset : offset + 1])
                self.wfile.flush()
        else:
            self.wfile.write(body[: script.cut_after])
            if script.cut_after is not None:
                self.close_connection = True
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads

    def __init__(self, context: ssl.SSLContext | None, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context, self.script, self.stop = context, script, threading.Event()

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        if self.context is None:
            return sock, address
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), (
            address
        )

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except OSError:
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-body is what these tests do


Serve = Callable[..., str]


def _server_context(lab: LabFiles, *, require_client: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(lab.server_cert, lab.server_key)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(lab.ca_cert)
    return context


@pytest.fixture
def serve(lab: LabFiles) -> Iterator[Serve]:
    """Start servers: serve(script, context=..., tls=True) -> base URL; all stopped at the end."""
    servers: list[tuple[_Server, threading.Thread]] = []

    def start(script: Script, *, context: ssl.SSLContext | None = None, tls: bool = True) -> str:
        server = _Server((context or _server_context(lab)) if tls else None, script)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="ota-test-server"
        )
        thread.start()
        servers.append((server, thread))
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def fetcher(lab: LabFiles) -> Iterator[HttpsFetcher]:
    client = HttpsFetcher(ca_file=lab.ca_cert)
    yield client
    client.close()


def test_download_with_client_certificate_when_the_server_requires_one(
    serve: Serve, lab: LabFiles, tmp_path: Path
) -> None:
    script = Script()
    url = serve(script, context=_server_context(lab, require_client=True)) + "/b.bundle"
    anonymous = HttpsFetcher(ca_file=lab.ca_cert)
    with pytest.raises(FetchError):
        anonymous.download(url, tmp_path / "anon.part", len(DATA), QUICK)
    anonymous.close()
    assert script.ranges == []  # no request got through without a certificate

    cert, key = lab.clients["gw-a"]
    client = HttpsFetcher(ca_file=lab.ca_cert, client_cert=cert, client_key=key)
    got = client.download(url, tmp_path / "b.part", len(DATA), QUICK)
    client.close()
    assert got.read_bytes() == DATA
    peer = script.peers[-1]
    assert peer is not None
    assert (("commonName", "gw-a"),) in peer["subject"]


def test_interrupted_download_resumes_with_range_requests(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    script = Script(cut_after=100_000)
    url = serve(script) + "/b.bundle"
    got = fetcher.download(url, tmp_path / "b.part", len(DATA), QUICK)
    assert got.read_bytes() == DATA
    assert script.ranges == [None, "bytes=100000-", "bytes=200000-", "bytes=300000-"]


def test_partial_file_from_an_earlier_run_is_continued_not_restarted(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    script = Script()
    url = serve(script) + "/b.bundle"
    partial = tmp_path / "b.part"
    partial.write_bytes(DATA[:123_456])
    assert fetcher.download(url, partial, len(DATA), QUICK).read_bytes() == DATA
    assert script.ranges == ["bytes=123456-"]


def test_server_ignoring_range_makes_the_download_start_over(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    script = Script(honour_range=False)
    url = serve(script) + "/b.bundle"
    partial = tmp_path / "b.part"
    partial.write_bytes(b"x" * 1000)  # not the file's bytes: a 200 must replace them
    assert fetcher.download(url, partial, len(DATA), QUICK).read_bytes() == DATA
    assert script.ranges == ["bytes=1000-"]


def test_a_connection_cut_every_time_without_progress_gives_up_after_the_attempts(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    script = Script(honour_range=False, cut_after=50_000)
    url = serve(script) + "/b.bundle"
    with pytest.raises(FetchError, match="gave up after 3 attempts"):
        fetcher.download(url, tmp_path / "b.part", len(DATA), QUICK)
    # the first attempt brought 50000 new bytes; the three after it brought nothing new
    assert script.ranges == [None, "bytes=50000-", "bytes=50000-", "bytes=50000-"]


def test_a_silent_server_fails_by_the_stall_timeout(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    url = serve(Script(silent=True)) + "/b.bundle"
    limits = DownloadLimits(timeout_s=20.0, stall_s=0.5, attempts=2, backoff_initial_s=0.05)
    with pytest.raises(FetchError, match=r"no data for 0\.5 s"):
        fetcher.download(url, tmp_path / "b.part", len(DATA), limits)


def test_a_server_dripping_bytes_fails_by_the_total_timeout(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    url = serve(Script(drip_s=0.05)) + "/b.bundle"
    limits = DownloadLimits(timeout_s=2.0, stall_s=1.0, attempts=3, backoff_initial_s=0.05)
    partial = tmp_path / "b.part"
    with pytest.raises(FetchError, match="not downloaded within 2 s"):
        fetcher.download(url, partial, len(DATA), limits)
    assert 0 < partial.stat().st_size < len(DATA)  # kept for the next try to resume


@pytest.mark.parametrize("send_length", [True, False], ids=["announced", "close-delimited"])
def test_a_server_sending_more_than_the_signed_length_is_cut_off(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path, send_length: bool
) -> None:
    url = serve(Script(extra=b"EVIL" * 10_000, send_length=send_length)) + "/b.bundle"
    partial = tmp_path / "b.part"
    with pytest.raises(FetchError, match=f"sent more than the {len(DATA)} bytes"):
        fetcher.download(url, partial, len(DATA), QUICK)
    assert not partial.exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, unmounted at the end."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_fails_clearly_and_removes_the_partial_file(
    serve: Serve, fetcher: HttpsFetcher, small_disk: Path
) -> None:
    big = os.urandom(2 * 1024 * 1024)
    url = serve(Script(data=big)) + "/b.bundle"
    partial = small_disk / "b.part"
    with pytest.raises(FetchError, match=f"disk full .* needs {len(big)} bytes"):
        fetcher.download(url, partial, len(big), QUICK)
    assert not partial.exists()
    assert list(small_disk.iterdir()) == []


def _misnamed_server(lab: LabFiles, directory: Path) -> ssl.SSLContext:
    """A server certificate from the lab CA, for repo.example only (not 127.0.0.1)."""
    ca = load_ca(lab.ca_cert.parent)  # the lab keeps ca.crt and ca.key side by side
    key = generate_key("p256")
    cert = issue_certificate(
        ca.cert,
        ca.key,
        "repo.example",
        key.public_key(),
        days=1,
        client=False,
        server=True,
        dns_names=["repo.example"],
    )
    write_private_key(directory / "misnamed.key", key)
    write_certificate(directory / "misnamed.crt", cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "misnamed.crt", directory / "misnamed.key")
    return context


def test_a_server_whose_certificate_names_another_host_is_refused(
    serve: Serve, fetcher: HttpsFetcher, lab: LabFiles, tmp_path: Path
) -> None:
    script = Script()
    url = serve(script, context=_misnamed_server(lab, tmp_path)) + "/b.bundle"
    with pytest.raises(FetchError, match=r"TLS with 127\.0\.0\.1"):
        fetcher.download(url, tmp_path / "b.part", len(DATA), QUICK)
    assert script.ranges == []


def test_a_server_from_another_ca_is_refused(
    serve: Serve, other_lab: LabFiles, tmp_path: Path
) -> None:
    script = Script()
    url = serve(script) + "/b.bundle"
    client = HttpsFetcher(ca_file=other_lab.ca_cert)
    with pytest.raises(FetchError, match="TLS with"):
        client.download(url, tmp_path / "b.part", len(DATA), QUICK)
    client.close()
    assert script.ranges == []


def test_plain_http_is_refused_before_any_request(
    serve: Serve, fetcher: HttpsFetcher, tmp_path: Path
) -> None:
    script = Script()
    url = serve(script, tls=False) + "/b.bundle"
    assert url.startswith("http://")
    with pytest.raises(FetchError, match="refusing insecure"):
        fetcher.download(url, tmp_path / "b.part", len(DATA), QUICK)
    with pytest.raises(tuf_errors.DownloadError, match="refusing insecure"):
        fetcher.download_bytes(url, 10_000_000)
    with pytest.raises(FetchError, match="refusing insecure"):
        fetcher_for(url.removesuffix("/b.bundle"))
    assert script.ranges == []


def test_metadata_fetch_is_bounded_by_max_length_and_reports_404(
    serve: Serve, fetcher: HttpsFetcher
) -> None:
    base = serve(Script(endless=True))
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        fetcher.download_bytes(base + "/1.root.json", 100_000)
    with pytest.raises(tuf_errors.DownloadHTTPError) as missing:
        fetcher.download_bytes(base + "/missing", 100_000)
    assert missing.value.status_code == 404


def test_metadata_fetch_returns_the_bytes_and_gives_up_on_a_drip(
    serve: Serve, lab: LabFiles
) -> None:
    whole = serve(Script(data=b'{"signed": {}}'))
    drip = serve(Script(drip_s=0.05))
    client = HttpsFetcher(ca_file=lab.ca_cert, timeout_s=1.0, metadata_timeout_s=1.0)
    assert client.download_bytes(whole + "/timestamp.json", 1000) == b'{"signed": {}}'
    with pytest.raises(tuf_errors.SlowRetrievalError):
        client.download_bytes(drip + "/timestamp.json", len(DATA) + 1)
    client.close()


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    root = tmp_path / "stick"
    (root / "targets").mkdir(parents=True)
    (root / "targets" / "b.bundle").write_bytes(DATA)
    (tmp_path / "secret").write_bytes(b"not for you")
    return root


def test_local_fetcher_copies_and_resumes_a_partial_file(stick: Path, tmp_path: Path) -> None:
    fetcher, _, targets = fetcher_for(str(stick))
    partial = tmp_path / "b.part"
    partial.write_bytes(b"x" * 5000)  # resuming keeps these; starting over would not
    got = fetcher.download(targets + "b.bundle", partial, len(DATA), QUICK)
    assert got.read_bytes() == b"x" * 5000 + DATA[5000:]


def test_local_fetcher_refuses_a_file_longer_than_the_signed_length(
    stick: Path, tmp_path: Path
) -> None:
    partial = tmp_path / "b.part"
    url = (stick / "targets" / "b.bundle").as_uri()
    with pytest.raises(FetchError, match="sent more than the 1000 bytes"):
        LocalFetcher(stick).download(url, partial, 1000, QUICK)
    assert not partial.exists()


def _escapes(stick: Path) -> Iterator[str]:
    yield stick.as_uri() + "/targets/../../secret"
    (stick / "targets" / "link").symlink_to(stick.parent / "secret")
    yield (stick / "targets" / "link").as_uri()


def test_local_fetcher_refuses_paths_that_leave_its_root(stick: Path, tmp_path: Path) -> None:
    fetcher = LocalFetcher(stick)
    for url in _escapes(stick):
        with pytest.raises(FetchError, match="outside the repository"):
            fetcher.download(url, tmp_path / "s.part", 11, QUICK)
        with pytest.raises(tuf_errors.DownloadError, match="outside the repository"):
            fetcher.download_bytes(url, 1000)


def test_local_fetcher_serves_metadata_bounded_and_refuses_non_files(stick: Path) -> None:
    fetcher, metadata, targets = fetcher_for(stick.as_uri())
    assert metadata == stick.resolve().as_uri() + "/metadata/"
    assert fetcher.download_bytes(targets + "b.bundle", len(DATA)) == DATA
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        fetcher.download_bytes(targets + "b.bundle", len(DATA) - 1)
    with pytest.raises(tuf_errors.DownloadHTTPError) as missing:
        fetcher.download_bytes(metadata + "2.root.json", 1000)
    assert missing.value.status_code == 404
    os.mkfifo(stick / "targets" / "fifo")
    with pytest.raises(tuf_errors.DownloadError, match="not a regular file"):
        fetcher.download_bytes(targets + "fifo", 1000)


def test_fetcher_for_maps_repository_locations(lab: LabFiles, tmp_path: Path) -> None:
    fetcher, metadata, targets = fetcher_for("https://updates.example/fleet/", ca_file=lab.ca_cert)
    assert isinstance(fetcher, HttpsFetcher)
    assert (metadata, targets) == (
        "https://updates.example/fleet/metadata/",
        "https://updates.example/fleet/targets/",
    )
    fetcher.close()
    local, metadata, _ = fetcher_for(str(tmp_path))
    assert isinstance(local, LocalFetcher)
    assert metadata == tmp_path.resolve().as_uri() + "/metadata/"
    for bad in ("relative/dir", "ftp://updates.example/", str(tmp_path / "absent")):
        with pytest.raises(FetchError):
            fetcher_for(bad)
