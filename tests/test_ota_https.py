"""The OTA flow over a real HTTPS repository that requires the gateway's client certificate.

A tiny release 2.0 (a real wheel and bundle, tests/ota_fixtures) is published with
images.repo; its `metadata/` and `targets/` (never `keys/`) are copied to a web root
that a threaded HTTPS server on 127.0.0.1 serves. The server's certificate comes from
the session's lab CA, and it requires a client certificate from that CA (TLS handshake
refused otherwise). The gateway's config names the repository as
`https://localhost:PORT/fleet` with `ota.ca` = the lab CA and the lab identity of gw-a;
`citygate ota apply` runs as a real process (`python -m agent.cli ota apply`).

The server can cut the bundle's first response after some bytes and then answer 503
(busy) to every later bundle request, until the test lets it serve again.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from agent.config import load_config
from agent.ota.flow import OtaManager
from provisioning.pki import LabFiles
from tests.ota_fixtures import make_bundle
from tests.test_ota_flow import TREE, committed_release, fake_wheel, make_repository

pytestmark = pytest.mark.integration

TIMEOUT_S = 120


@dataclass(frozen=True)
class Seen:
    """One request that got past the TLS handshake."""

    path: str
    range: str | None
    client: str | None  # the client certificate's common name


@dataclass
class Repository:
    """What the server serves and what it saw."""

    www: Path
    url: str = ""
    cut_bundle_after: int | None = None  # armed: the first bundle response stops here
    seen: list[Seen] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # failed TLS handshakes
    cut_done: bool = False

    def bundle_ranges(self) -> list[str | None]:
        return [s.range for s in self.seen if s.path.endswith(".bundle")]


def _common_name(peer: dict[str, Any] | None) -> str | None:
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        repo = self.server.repo
        path = unquote(urlsplit(self.path).path)
        requested = self.headers.get("Range")
        assert isinstance(self.request, ssl.SSLSocket)
        repo.seen.append(Seen(path, requested, _common_name(self.request.getpeercert())))
        file = (repo.www / path.lstrip("/")).resolve()
        if not file.is_relative_to(repo.www) or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        cut: int | None = None
        if path.endswith(".bundle") and repo.cut_bundle_after is not None:
            if repo.cut_done:
                self.send_error(503)  # busy until the test disarms the fault
                return
            repo.cut_done, cut = True, repo.cut_bundle_after
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
        if requested:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:cut])
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads

    def __init__(self, context: ssl.SSLContext, repo: Repository) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context, self.repo = context, repo

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), (
            address
        )

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            request.do_handshake()
        except OSError as exc:
            self.repo.refused.append(str(exc))
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-body (the cut) is expected


@dataclass(frozen=True)
class Published:
    www: Path  # the web root; the repository is www/fleet
    trusted_root: Path  # the root the gateway ships with (1.root.json)
    bundle_length: int


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    base = tmp_path_factory.mktemp("ota-https")
    bundle = make_bundle(base, "2.0", [fake_wheel(base / "wheels", "2.0", selftest_ok=True)])
    repo = make_repository(base / "repo", [bundle])
    www = base / "www"
    for part in ("metadata", "targets"):  # what a repository server publishes; keys stay home
        shutil.copytree(repo / part, www / "fleet" / part)
    trusted = base / "update-root.json"
    shutil.copyfile(repo / "metadata/1.root.json", trusted)
    return Published(www.resolve(), trusted, bundle.stat().st_size)


@pytest.fixture
def server(lab: LabFiles, published: Published) -> Iterator[Repository]:
    """The repository over HTTPS: lab server certificate, lab client certificate required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(lab.server_cert, lab.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(lab.ca_cert)
    repo = Repository(published.www)
    httpd = _Server(context, repo)
    repo.url = f"https://localhost:{httpd.server_address[1]}/fleet"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ota-https-repo"
    )
    thread.start()
    yield repo
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@dataclass(frozen=True)
class Gateway:
    config: Path
    root: Path
    state: Path

    def apply(self) -> subprocess.CompletedProcess[str]:
        """`citygate ota apply` with the repository of the config (ota.repo)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CITYGATE_", "FAKE_"))}
        env["PYTHONPATH"] = str(TREE)
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "ota", "apply", "--config", str(self.config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    def current(self) -> str:
        return os.readlink(self.root / "current")


def _gateway(
    tmp: Path,
    lab: LabFiles,
    identity: LabFiles,
    repo: Repository,
    published: Published,
    **ota: object,
) -> Gateway:
    root, state = tmp / "opt", tmp / "state"
    committed_release(root)
    cert, key = identity.clients["gw-a"]
    settings = {
        "repo": repo.url,
        "root": str(root),
        "trusted_root": str(published.trusted_root),
        "ca": str(lab.ca_cert),
        **ota,
    }
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    config = tmp / "gateway.toml"
    config.write_text(
        f'[gateway]\nstate_dir = "{state}"\n'
        f'[identity]\nkey = "{key}"\ncert = "{cert}"\nca = "{identity.ca_cert}"\n'
        '[broker]\nhost = "mqtt.example.city"\n'
        f"[ota]\n{lines}"
    )
    return Gateway(config, root, state)


def test_apply_over_mutual_tls_installs_and_switches(
    tmp_path: Path, lab: LabFiles, server: Repository, published: Published
) -> None:
    gw = _gateway(tmp_path, lab, lab, server, published)
    result = gw.apply()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("switched: switched to 2.0"), result.stdout
    assert gw.current() == "releases/2.0"
    assert server.refused == []
    assert {s.client for s in server.seen} == {"gw-a"}  # every request carried gw-a's cert
    paths = [s.path for s in server.seen]
    assert "/fleet/metadata/timestamp.json" in paths
    assert server.bundle_ranges() == [None]  # the bundle, in one piece


def test_a_gateway_without_a_fleet_certificate_is_refused_and_nothing_switches(
    tmp_path: Path, lab: LabFiles, other_lab: LabFiles, server: Repository, published: Published
) -> None:
    gw = _gateway(tmp_path, lab, other_lab, server, published)  # gw-a of another CA
    result = gw.apply()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("retry: checking https://localhost:"), result.stderr
    assert "the next run retries" in result.stderr
    assert gw.current() == "releases/1.0"
    assert server.seen == []  # no request got past the handshake
    assert server.refused != []

    # the flow itself, offering no client certificate at all
    config = load_config(gw.config)
    manager = OtaManager(
        config.gateway.state_dir, config.ota, clock_trusted=lambda: True, client_cert=None
    )
    outcome = manager.apply(None, wait_s=10)
    assert (outcome.result, outcome.ok, outcome.restart) == ("retry", False, False), outcome
    assert manager.status()["current"] == "1.0"
    assert server.seen == []


def test_a_download_cut_by_the_server_resumes_on_the_next_apply(
    tmp_path: Path, lab: LabFiles, server: Repository, published: Published
) -> None:
    cut = published.bundle_length // 3
    server.cut_bundle_after = cut  # then 503 until disarmed
    gw = _gateway(tmp_path, lab, lab, server, published, download_timeout_s=4.0)
    first = gw.apply()
    assert first.returncode == 1, first.stdout + first.stderr
    assert first.stderr.startswith("retry: "), first.stderr
    assert "resumes" in first.stderr
    partial = gw.state / "ota/downloads/citygate-2.0.bundle.part"
    assert partial.stat().st_size == cut  # kept for the next run
    assert gw.current() == "releases/1.0"
    assert server.bundle_ranges()[0] is None

    server.cut_bundle_after = None
    before = len(server.bundle_ranges())
    second = gw.apply()
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.startswith("switched: switched to 2.0"), second.stdout
    assert server.bundle_ranges()[before:] == [f"bytes={cut}-"]  # resumed, not restarted
    assert gw.current() == "releases/2.0"
    assert not (gw.state / "ota/downloads").exists()
