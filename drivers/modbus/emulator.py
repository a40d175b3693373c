"""Emulated Modbus buses for tests, demos and rigs: pymodbus servers over TCP and over paced ptys.

`ModbusTcpEmulator` serves a list of `EmulatedDevice`s (one unit id each) with
a pymodbus 3.16 TCP server on a free loopback port; `port` is the
``tcp://127.0.0.1:N`` a sensor config names.

`ModbusRtuEmulator` serves them with a pymodbus RTU server as one RS-485
bus. The host opens `port`, the slave side of a pseudo-terminal, exactly as it
would open /dev/ttyUSB0. A pty moves any number of bytes at once, so a small
relay sits between it and a second pty on which the pymodbus server listens:
it models the half-duplex line, delivering each byte only when its last bit
would have left a real UART at the configured baud rate (10 bits a byte for
8N1), in bursts of up to `BURST_BYTES`. It counts the bytes in each direction.

Faults: per device (see `EmulatedDevice`) no answer, late answers, exception
codes, another word order, S8 warm-up; per bus `disconnect()` (TCP: drop the
client's connection; RTU: hang up the pty and remove `link`, if given;
`replug()` makes a new pty and points `link` at it). A dead or unknown unit is
silent: its reply is dropped on the way out. Over TCP a device busy with a
late answer ignores further requests (pymodbus's server would stamp the late
answer with the newest request's transaction id, and a client would take a
stale answer for a fresh one); the late answer of a request that others
overtook is dropped.

Each emulator runs its own asyncio loop in one background thread; use it as
a context manager (or start()/stop()), which leaves no thread or fd behind.

Trust: requests are served as a device would; fault injection is trusted test code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import tty
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.simdevice import EmulatedDevice

_T = TypeVar("_T")

BITS_PER_BYTE = 10  # 8N1: start, 8 data, stop
BURST_BYTES = 4
_MBAP_UNIT = 6  # the unit id's offset in a Modbus TCP frame
_THREAD_TIMEOUT_S = 10.0


class _LoopThread:
    """An asyncio loop in a thread: `setup` runs first, `teardown` when stopped."""

    def __init__(
        self,
        name: str,
        setup: Callable[[], Awaitable[None]],
        teardown: Callable[[], Awaitable[None]],
    ) -> None:
        self._name = name
        self._setup = setup
        self._teardown = teardown
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name=self._name)
        self._thread.start()
        if not self._ready.wait(_THREAD_TIMEOUT_S):
            raise TimeoutError(f"{self._name} did not start")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            try:
                await self._setup()
            except BaseException as exc:  # handed to the thread that called start()
                self._error = exc
                return
            finally:
                self._ready.set()
            await self._stop.wait()
        finally:
            await self._teardown()  # also after a partial setup: it closes what exists

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the loop thread and return its result."""
        if self._loop is None or self._thread is None:
            return fn()

        async def wrapper() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(_THREAD_TIMEOUT_S)

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_THREAD_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._name} did not stop")
        self._thread = None


def _catch_all() -> SimDevice:
    """Device 0 answers for unknown unit ids (pymodbus's rule); its replies are dropped."""
    return SimDevice(0, simdata=[SimData(0, datatype=DataType.INVALID)])


class _Emulator:
    """What both emulators share: devices, silence for dead units, the lifecycle."""

    def __init__(self, devices: Sequence[EmulatedDevice], name: str) -> None:
        units = [d.unit_id for d in devices]
        if len(set(units)) != len(units) or 0 in units:
            raise ValueError(f"unit ids must be distinct and non-zero, got {units}")
        self.devices = list(devices)
        self._by_unit = {d.unit_id: d for d in devices}
        self._thread = _LoopThread(name, self._setup, self._teardown)

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
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def device(self, unit: int) -> EmulatedDevice:
        return self._by_unit[unit]

    def _context(self) -> list[SimDevice]:
        return [d.sim_device() for d in self.devices] + [_catch_all()]

    def _silenced(self, unit: int) -> bool:
        device = self._by_unit.get(unit)
        return device is None or device.dead

    def _busy(self, unit: int) -> bool:
        device = self._by_unit.get(unit)
        return device is not None and device.busy

    async def _setup(self) -> None:
        raise NotImplementedError

    async def _teardown(self) -> None:
        raise NotImplementedError


class ModbusTcpEmulator(_Emulator):
    """Devices behind one Modbus TCP server (as behind an RTU-to-TCP gateway)."""

    def __init__(self, devices: Sequence[EmulatedDevice], host: str = "127.0.0.1") -> None:
        super().__init__(devices, "modbus-tcp-emulator")
        self.host = host
        self.tcp_port = 0
        self._server: ModbusTcpServer | None = None

    @property
    def port(self) -> str:
        return f"tcp://{self.host}:{self.tcp_port}"

    async def _setup(self) -> None:
        server = ModbusTcpServer(
            self._context(),
            address=(self.host, 0),
            ignore_missing_devices=True,
            trace_packet=self._trace,
        )
        await server.serve_forever(background=True)
        self.tcp_port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._server = server

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if len(data) <= _MBAP_UNIT:
            return data
        unit = data[_MBAP_UNIT]
        if sending:
            return b"" if self._silenced(unit) else data
        if self._busy(unit):  # readdressed to the catch-all device, whose replies are dropped
            return data[:_MBAP_UNIT] + b"\0" + data[_MBAP_UNIT + 1 :]
        return data

    async def _teardown(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus is untyped here

    def disconnect(self) -> None:
        """Drop every client connection; the server keeps listening."""

        def drop() -> None:
            assert self._server is not None
            for connection in list(self._server.active_connections.values()):
                connection.close()

        self._thread.call(drop)


class _PacedRelay:
    """One half-duplex line between the host's pty and the server's pty, paced at a baud rate."""

    def __init__(self, loop: asyncio.AbstractEventLoop, baud: int, device_fd: int) -> None:
        self._loop = loop
        self._byte_s = BITS_PER_BYTE / baud
        self._device_fd = device_fd
        self._host_fd: int | None = None
        self._host_generation = 0
        self._free_at = 0.0
        self.bytes_to_devices = 0
        self.bytes_to_host = 0
        loop.add_reader(device_fd, self._pump, device_fd, False)

    def attach_host(self, fd: int) -> None:
        self._host_fd = fd
        self._host_generation += 1
        self._loop.add_reader(fd, self._pump, fd, True)

    def detach_host(self) -> None:
        if self._host_fd is not None:
            self._loop.remove_reader(self._host_fd)
        self._host_fd = None
        self._host_generation += 1

    def close(self) -> None:
        self.detach_host()
        self._loop.remove_reader(self._device_fd)

    def _pump(self, source: int, from_host: bool) -> None:
        try:
            data = os.read(source, 4096)
        except OSError:  # BlockingIOError, or EIO while a side is being replaced
            return
        self.send(data, to_host=not from_host)

    def send(self, data: bytes, *, to_host: bool) -> None:
        """Put `data` on the line (after whatever is on it), delivered at the line's pace."""
        now = self._loop.time()
        start = max(now, self._free_at)
        generation = self._host_generation
        for i in range(0, len(data), BURST_BYTES):
            chunk = data[i : i + BURST_BYTES]
            due = start + (i + len(chunk)) * self._byte_s
            self._loop.call_at(due, self._deliver, to_host, chunk, generation)
        self._free_at = start + len(data) * self._byte_s

    def _deliver(self, to_host: bool, chunk: bytes, generation: int) -> None:
        if generation != self._host_generation:
            return  # the host side was unplugged meanwhile: the bytes are lost
        fd = self._host_fd if to_host else self._device_fd
        if fd is None:
            return
        if to_host:  # counted before the write: the reader may act on the bytes at once
            self.bytes_to_host += len(chunk)
        else:
            self.bytes_to_devices += len(chunk)
        with contextlib.suppress(OSError):
            os.write(fd, chunk)


def _raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave


class ModbusRtuEmulator(_Emulator):
    """Devices on one emulated RS-485 bus: a pymodbus RTU server behind a paced pty."""

    def __init__(
        self, devices: Sequence[EmulatedDevice], *, baud: int = 9600, link: str | None = None
    ) -> None:
        super().__init__(devices, "modbus-rtu-emulator")
        self.baud = baud
        self.link = link
        self.host_path = ""
        self._host: tuple[int, int] | None = None
        self._device_pty: tuple[int, int] | None = None
        self._relay: _PacedRelay | None = None
        self._server: ModbusSerialServer | None = None
        self._bad_crcs = 0  # replies still to be sent with a wrong CRC

    @property
    def port(self) -> str:
        """What the host opens: `link` if given, else the pty's slave path."""
        return self.link if self.link is not None else self.host_path

    @property
    def bytes_to_devices(self) -> int:
        return self._relay.bytes_to_devices if self._relay is not None else 0

    @property
    def bytes_to_host(self) -> int:
        return self._relay.bytes_to_host if self._relay is not None else 0

    async def _setup(self) -> None:
        loop = asyncio.get_running_loop()
        self._device_pty = _raw_pty()
        self._relay = _PacedRelay(loop, self.baud, self._device_pty[0])
        self._plug()
        server = ModbusSerialServer(
            self._context(),
            port=os.ttyname(self._device_pty[1]),
            baudrate=self.baud,
            ignore_missing_devices=True,
            reconnect_delay=0,
            trace_packet=self._trace,
        )
        await server.serve_forever(background=True)
        self._server = server

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending and data and self._silenced(data[0]):
            return b""
        if sending and data and self._bad_crcs:
            self._bad_crcs -= 1
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    def inject_noise(self, data: bytes) -> None:
        """`data` on the line towards the host, as another talker or a loose connector
        would put it there (between or inside replies)."""

        def apply() -> None:
            if self._relay is not None:
                self._relay.send(data, to_host=True)

        self._thread.call(apply)

    def inject_bad_checksum(self) -> None:
        """The next reply on the line goes out with a wrong CRC."""

        def apply() -> None:
            self._bad_crcs += 1

        self._thread.call(apply)

    async def _teardown(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus is untyped here
        if self._relay is not None:
            self._relay.close()
        self._unplug()
        if self._device_pty is not None:
            for fd in self._device_pty:
                os.close(fd)
            self._device_pty = None

    def _plug(self) -> None:
        assert self._relay is not None
        master, slave = _raw_pty()
        self._host = (master, slave)
        self.host_path = os.ttyname(slave)
        self._relay.attach_host(master)
        if self.link is not None:
            tmp = f"{self.link}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(self.host_path, tmp)
            os.replace(tmp, self.link)

    def _unplug(self) -> None:
        if self._relay is not None:
            self._relay.detach_host()
        if self._host is not None:
            for fd in self._host:
                os.close(fd)
            self._host = None
        # as udev removes an unplugged adapter's name: a stale link would point at a pty
        # number that any process may get next
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.link)

    def disconnect(self) -> None:
        """Hang up the host's pty (an unplugged USB adapter; `link` goes with it); `replug()`
        brings a new one."""
        self._thread.call(self._unplug)

    def replug(self) -> None:
        """A new host pty: `host_path` changes, `link` (if given) follows it."""

        def apply() -> None:
            self._unplug()
            self._plug()

        self._thread.call(apply)
