"""One scheduler per physical bus, shared by every device configured on it.

A bus is one serial port (an RS-485 line or a UART) or one TCP host:port.
Every sensor whose `port` names it shares one `Bus`, handed out by a
`BusRegistry` with reference counting: the last driver to stop closes it.

The bus owns the link and serialises transactions strictly: one request and
its reply at a time, in the order devices ask (asyncio.Lock is first come,
first served). Before each request it keeps

- the RTU silent interval t3.5 after the previous frame (sized from the real
  character format; fixed 1.75 ms above 19200 baud; none on TCP),
- the device's own minimum idle time since its previous transaction (Eastron
  meters need 60 ms), waited *before* queueing, so others use the bus meanwhile,
- the device's timeout, to which the wire time of the request and the reply is
  added; a request past it is cancelled and the bus moves on.

Retries (for no answer, "busy" and "acknowledge" exceptions) queue again like
any other transaction, so a dead or slow device costs the bus only its own
timeouts. After a timeout an RTU line is kept quiet for one more timeout, so
that a late reply (which carries no transaction id) is dropped instead of being
taken for the answer to the next request. A link that cannot be opened is
retried with a backoff (0.5 s doubling to 30 s, each retry logged with its
delay); while it is down, requests fail at once with the reason.

Trust: nothing from the wire is interpreted here; `drivers.modbus.link`
checks replies. Devices are trusted callers within the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from drivers.modbus import codec
from drivers.modbus.link import ExceptionReply, Link, LinkDown, NoReply, PymodbusLink
from drivers.modbus.options import BusSettings

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
RETRYABLE_EXCEPTIONS = (5, 6)  # acknowledge (still working), server device busy
_TCP_OVERHEAD = 4  # an MBAP header (7 bytes) replaces the unit id and the CRC (3 bytes)


class BusConflict(Exception):
    """A sensor asks for a bus that is already open with other settings."""


@dataclass
class Device:
    """One device's place on a bus: its unit id, timing, and what happened to its requests."""

    unit: int
    timeout_s: float
    retries: int
    min_idle_s: float
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("transactions", "timeouts", "retries", "exceptions", "bytes_out", "bytes_in"), 0
        )
    )


@dataclass(frozen=True, slots=True)
class Transaction:
    """One finished transaction, for benchmarks: times are loop.time() seconds."""

    unit: int
    started: float
    ended: float
    bytes_out: int
    bytes_in: int
    answered: bool  # a reply (or an exception reply) came back


class Bus:
    """The scheduler of one physical bus; create it through `BusRegistry.acquire`."""

    def __init__(self, settings: BusSettings, link: Link) -> None:
        self.settings = settings
        self.users = 0
        self.opens = 0
        #: set to a list to record every transaction (benchmarks)
        self.trace: list[Transaction] | None = None
        self._link = link
        self._lock = asyncio.Lock()
        self._quiet_at = 0.0  # loop time from which the line has been silent long enough
        self._ready_at: dict[int, float] = {}  # per unit id: idle time kept until then
        self._retry_open_at = 0.0
        self._backoff = BACKOFF_INITIAL_S
        self._down_reason = ""
        self._was_open = False
        if settings.is_tcp:
            self.silent_interval_s = 0.0
            self.byte_time_s = 0.0
        else:
            bits = 1 + 8 + (0 if settings.parity == "N" else 1) + settings.stop_bits
            self.silent_interval_s = codec.silent_interval_s(settings.baud, bits)
            self.byte_time_s = bits / settings.baud

    # -- devices -------------------------------------------------------------------

    def attach(self, unit: int, timeout_s: float, retries: int, min_idle_s: float) -> Device:
        """A device handle; devices with the same unit id share its idle time."""
        self._ready_at.setdefault(unit, 0.0)
        return Device(unit, timeout_s, retries, min_idle_s)

    def hold(self, device: Device, seconds: float) -> None:
        """Ask nothing of `device` for `seconds` from now (after a trigger, for instance)."""
        until = asyncio.get_running_loop().time() + seconds
        self._ready_at[device.unit] = max(self._ready_at.get(device.unit, 0.0), until)

    def frame_bytes(self, rtu_len: int) -> int:
        """Bytes on this bus of a frame that takes `rtu_len` bytes in RTU framing."""
        return rtu_len + _TCP_OVERHEAD if self.settings.is_tcp else rtu_len

    # -- transactions --------------------------------------------------------------

    async def read(self, device: Device, function: int, start: int, count: int) -> list[int]:
        """Read registers, with the device's timeout and retries; LinkError on failure."""
        out = self.frame_bytes(codec.RTU_REQUEST_LEN)
        back = self.frame_bytes(codec.read_reply_len(count))
        return await self._request(
            device, lambda: self._link.read(device.unit, function, start, count), out, back
        )

    async def write(self, device: Device, address: int, value: int) -> None:
        """Write one holding register (function 6; the device echoes the request)."""
        size = self.frame_bytes(codec.RTU_REQUEST_LEN)
        await self._request(
            device, lambda: self._link.write(device.unit, address, value), size, size
        )

    async def _request(
        self, device: Device, call: Callable[[], Awaitable[_T]], out: int, back: int
    ) -> _T:
        attempts = device.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(device, call, out, back)
            except (NoReply, ExceptionReply) as exc:
                retry = isinstance(exc, NoReply) or exc.code in RETRYABLE_EXCEPTIONS
                if not retry or attempt == attempts:
                    raise
                device.counters["retries"] += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, device: Device, call: Callable[[], Awaitable[_T]], out: int, back: int
    ) -> _T:
        loop = asyncio.get_running_loop()
        await _sleep_until(loop, self._ready_at.get(device.unit, 0.0))
        async with self._lock:
            await self._ensure_open(loop)
            await _sleep_until(loop, self._quiet_at)
            limit = device.timeout_s + self.byte_time_s * (out + back)
            started = loop.time()
            received = 0
            timed_out = False
            try:
                async with asyncio.timeout(limit):
                    result = await call()
                received = back
            except TimeoutError:
                device.counters["timeouts"] += 1
                timed_out = True
                raise NoReply(
                    f"no answer from unit {device.unit} within {limit * 1000:.0f} ms"
                ) from None
            except ExceptionReply:
                device.counters["exceptions"] += 1
                received = self.frame_bytes(codec.RTU_EXCEPTION_LEN)
                raise
            finally:
                self._finish(loop, device, started, out, received)
                if timed_out:
                    self._await_late_reply(loop, limit)
            return result

    def _await_late_reply(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        """After a timeout on a serial line, keep it quiet for one more timeout.

        An RTU reply carries no transaction id: a device that answers late would
        have its reply taken for the answer to the next request (stale values, or
        another register group's). A late reply that arrives while nothing is asked
        is dropped by the client. TCP replies carry the transaction id: no wait.
        """
        if not self.settings.is_tcp:
            self._quiet_at = max(self._quiet_at, loop.time() + limit)

    def _finish(
        self, loop: asyncio.AbstractEventLoop, device: Device, started: float, out: int, back: int
    ) -> None:
        ended = loop.time()
        self._quiet_at = ended + self.silent_interval_s
        idle = max(device.min_idle_s, self.silent_interval_s)
        self._ready_at[device.unit] = max(self._ready_at.get(device.unit, 0.0), ended + idle)
        counters = device.counters
        counters["transactions"] += 1
        counters["bytes_out"] += out
        counters["bytes_in"] += back
        if self.trace is not None:
            self.trace.append(Transaction(device.unit, started, ended, out, back, back > 0))

    async def _ensure_open(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._link.is_open:
            return
        if self._was_open:
            self._was_open = False
            _log.warning("bus %s: connection lost", self.settings.port)
        now = loop.time()
        if now < self._retry_open_at:
            raise LinkDown(self._down_reason)
        try:
            await self._link.open()
        except LinkDown as exc:
            if str(exc) != self._down_reason:
                _log.warning("bus %s: %s (retrying with backoff)", self.settings.port, exc)
            _log.info("bus %s: retrying in %.1f s", self.settings.port, self._backoff)
            self._down_reason = str(exc)
            self._retry_open_at = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            raise
        self.opens += 1
        self._was_open = True
        self._down_reason = ""
        self._backoff = BACKOFF_INITIAL_S
        self._quiet_at = loop.time() + self.silent_interval_s
        _log.info("bus %s: open (%s)", self.settings.port, self.settings.describe())

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the bus between transactions: waits for the one under way, keeps others out."""
        async with self._lock:
            yield

    def close(self) -> None:
        self._link.close()
        self._was_open = False


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


class BusRegistry:
    """The open buses of one driver family, keyed by `port`, shared with reference counting."""

    def __init__(self, link_factory: Callable[[BusSettings], Link] = PymodbusLink) -> None:
        self._link_factory = link_factory
        self._buses: dict[str, Bus] = {}

    def __len__(self) -> int:
        return len(self._buses)

    def get(self, port: str) -> Bus | None:
        return self._buses.get(port)

    def acquire(self, settings: BusSettings) -> Bus:
        """The bus for `settings.port`, opened lazily; BusConflict if its settings differ."""
        bus = self._buses.get(settings.port)
        if bus is None:
            bus = Bus(settings, self._link_factory(settings))
            self._buses[settings.port] = bus
        elif bus.settings != settings:
            raise BusConflict(
                f"bus {settings.port} is shared at {bus.settings.describe()}, "
                f"this sensor asks for {settings.describe()}"
            )
        bus.users += 1
        return bus

    def release(self, bus: Bus) -> None:
        """Drop one user; the last one closes the bus."""
        bus.users -= 1
        if bus.users <= 0:
            bus.close()
            if self._buses.get(bus.settings.port) is bus:
                del self._buses[bus.settings.port]
            _log.info("bus %s: closed", bus.settings.port)
