"""The network fault proxy on its own, in front of a tiny echo server.

Each fault is shown from the client's side, as the agent would meet it:
refused connects after a cut, silence (and no loss) through a blackhole, a
paced stream through a slow link, a reset connection after a reset.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from hil_tests.netproxy import NetProxy

_WAIT_S = 5.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            return


class _EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    block_on_close = True  # server_close() joins the handler threads


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="echo-server")
    thread.start()
    try:
        host, port = server.socket.getsockname()
        yield host, port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[NetProxy]:
    with NetProxy(*echo) as running:
        yield running


def _connect(proxy: NetProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=_WAIT_S)


def _echoed(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_bytes_pass_both_ways_and_are_counted(proxy: NetProxy) -> None:
    with _connect(proxy) as sock:
        assert _echoed(sock, b"hello broker") == b"hello broker"
    assert proxy.connections == 1
    # the proxy counts a chunk after forwarding it: the echo can reach us first
    deadline = time.monotonic() + 5.0
    while (proxy.bytes_to_upstream, proxy.bytes_to_client) != (12, 12):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert (proxy.bytes_to_upstream, proxy.bytes_to_client) == (12, 12)


def test_cut_closes_connections_refuses_new_ones_and_restore_reopens(proxy: NetProxy) -> None:
    with _connect(proxy) as sock:
        assert _echoed(sock, b"before") == b"before"
        proxy.cut()
        assert sock.recv(16) == b""  # the open connection was closed
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    proxy.restore()
    with _connect(proxy) as sock:
        assert _echoed(sock, b"after") == b"after"


def test_blackhole_accepts_but_moves_nothing_until_restored_then_nothing_is_lost(
    proxy: NetProxy,
) -> None:
    with _connect(proxy) as before:
        assert _echoed(before, b"one") == b"one"
        proxy.blackhole()
        with _connect(proxy) as during:  # accepted: no refusal, no reset
            before.sendall(b"held")
            during.sendall(b"also held")
            for sock in (before, during):
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(16)
                sock.settimeout(_WAIT_S)
            proxy.restore()
            assert _recv_exactly(before, 4) == b"held"
            assert _recv_exactly(during, 9) == b"also held"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


def test_slow_link_never_delivers_faster_than_its_rate(proxy: NetProxy) -> None:
    rate = 4000
    payload = bytes(range(256)) * 16  # 4096 bytes: about a second at the rate
    proxy.slow(rate)
    with _connect(proxy) as sock:
        sent_at = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        done_at = time.monotonic()
    assert got == payload
    # an upper bound on throughput, which a slow machine can only keep further from: no
    # more bytes than the rate allows in the time that passed, plus the first slice
    # (1/20 s of bytes) that each direction sends before its first pause
    slice_bytes = rate / 20
    assert len(payload) <= rate * (done_at - sent_at) + 2 * slice_bytes


def test_reset_aborts_open_connections_and_accepts_new_ones(proxy: NetProxy) -> None:
    with _connect(proxy) as sock:
        assert _echoed(sock, b"ping") == b"ping"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(16)
    assert proxy.open_connections == 0
    with _connect(proxy) as sock:
        assert _echoed(sock, b"again") == b"again"


def test_upstream_down_closes_the_client_connection(echo: tuple[str, int]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: connects are refused
        with NetProxy("127.0.0.1", dead_port) as proxy, _connect(proxy) as sock:
            assert sock.recv(16) == b""  # closed at once: nothing is there to talk to
