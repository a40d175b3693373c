"""A TCP proxy that stands for the network between the agent and the broker, with faults.

`NetProxy` listens on a loopback port and forwards every connection to an
upstream address (the broker; for an emulated Modbus TCP sensor, its server).
The agent is configured with the proxy's port, so the scenarios can break the
link without touching either end:

- `cut()`: close every connection and refuse new ones (nothing listens), as
  when a router or a modem goes down;
- `blackhole()`: keep accepting, but move no byte in either direction; the
  bytes wait in the kernel's buffers, as on a link whose packets are dropped
  while TCP keeps retransmitting, and flow on unharmed after `restore()`;
- `slow(bytes_per_s)`: pace each direction of each connection at that rate;
- `reset()`: abort every open connection with a TCP RST to both ends (a
  stateful firewall or NAT forgetting the flow); new connections are accepted;
- `restore()`: undo all of the above.

The proxy runs its own asyncio loop in one background thread, so its pacing
does not depend on what the test's loop is doing; the fault methods are plain
calls that return once the proxy has applied them. Use it as a context manager
(or start()/stop()); stop() leaves no thread, task or socket behind.

Trust: the bytes are forwarded untouched and never parsed; callers are test code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

_T = TypeVar("_T")

_CALL_TIMEOUT_S = 10.0
_CHUNK = 16384
_PACE_SLICES_PER_S = 20  # a slow link moves bytes in 1/20 s slices, not in bursts of a second


class NetProxy:
    """One listening port on `host` forwarding to `upstream_host:upstream_port`."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "netproxy",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port  # the bound port once started (a free one if 0)
        self.name = name
        self.mode = "open"  # "open", "cut" or "blackhole"
        self.rate: float | None = None  # bytes/s per direction of each connection; None: free
        # what happened, for scenarios to look at
        self.connections = 0  # accepted while not cut
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self._ready.clear()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name=self.name)
        self._thread.start()
        if not self._ready.wait(_CALL_TIMEOUT_S):
            raise TimeoutError(f"{self.name} did not start")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error

    def stop(self) -> None:
        """Close every connection and the listening socket; end the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        assert self._loop is not None
        assert self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)
        thread.join(_CALL_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop")

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- faults -----------------------------------------------------------------------

    def cut(self) -> None:
        """Close every connection (FIN to both ends) and stop listening: connects are refused."""

        async def apply() -> None:
            self.mode = "cut"
            assert self._flowing is not None
            self._flowing.set()  # paused pumps wake up and find their sockets closed
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.close()
            self._links.clear()

        self._call(apply)

    def blackhole(self) -> None:
        """Accept connections but move no byte; held bytes flow again after `restore()`."""

        async def apply() -> None:
            await self._listen()
            self.mode = "blackhole"
            assert self._flowing is not None
            self._flowing.clear()

        self._call(apply)

    def slow(self, bytes_per_s: float) -> None:
        """Pace each direction of each connection at `bytes_per_s` (the link stays up)."""
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be positive, got {bytes_per_s}")

        async def apply() -> None:
            self.rate = float(bytes_per_s)

        self._call(apply)

    def reset(self) -> None:
        """Abort every open connection with an RST to both ends; keep accepting new ones."""

        async def apply() -> None:
            for link in list(self._links):
                link.reset()
            self._links.clear()

        self._call(apply)

    def restore(self) -> None:
        """Listen again (after a cut), let bytes flow (after a blackhole), at full speed."""

        async def apply() -> None:
            await self._listen()
            self.mode = "open"
            self.rate = None
            assert self._flowing is not None
            self._flowing.set()

        self._call(apply)

    # -- the loop thread ------------------------------------------------------------------

    def _call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        if self._loop is None or self._thread is None:
            raise RuntimeError(f"{self.name} is not running")

        async def run() -> _T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(_CALL_TIMEOUT_S)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        try:
            try:
                await self._listen()
            except BaseException as exc:  # handed to the thread that called start()
                self._error = exc
                return
            finally:
                self._ready.set()
            await self._stopping.wait()
        finally:
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.reset()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a reset or a refused upstream: the link is closed below either way
        finally:
            writer.transport.abort()
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":  # accepted just before the listening socket closed
            return
        self.connections += 1
        assert self._flowing is not None
        await self._flowing.wait()  # a blackhole accepts, but reaches nobody
        if self.mode == "cut":
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
                asyncio.create_task(self._pump(up_reader, writer, upstream=False)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.close()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        """Copy bytes one way until end of stream, held while blackholed, paced while slow."""
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            rate = self.rate
            size = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate / _PACE_SLICES_PER_S)))
            data = await source.read(size)
            if not data:
                return
            await self._flowing.wait()
            sink.write(data)
            await sink.drain()
            if upstream:
                self.bytes_to_upstream += len(data)
            else:
                self.bytes_to_client += len(data)
            if rate is not None:
                await asyncio.sleep(len(data) / rate)


class _Link:
    """Both sockets of one proxied connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self._writers = (client, upstream)

    def close(self) -> None:
        """An orderly close (FIN) of both sockets."""
        for writer in self._writers:
            writer.close()

    def reset(self) -> None:
        """An abortive close: SO_LINGER 0 makes the kernel send RST instead of FIN."""
        for writer in self._writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
