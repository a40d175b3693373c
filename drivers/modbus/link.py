"""The transport seam: one Modbus client on one bus (RTU on a serial port, or TCP), via pymodbus.

`Link` is the small interface the bus scheduler talks to; `PymodbusLink` is
its one real implementation, over pymodbus 3.16's asyncio clients (the unit
is passed as ``device_id=``). pymodbus is asked for single attempts only: no
retries and no automatic reconnection of its own (retries=0,
reconnect_delay=0), because timeouts, retries, silent intervals and
reconnection belong to the bus scheduler, which also cancels a request when a
device's own timeout expires.

Errors are translated here, once: `LinkDown` (the port or connection is not
there), `ExceptionReply` (the device answered with an exception code),
`BadReply` (an answer that does not fit the request). A request that gets no
answer is simply cancelled by the caller's timeout.

Trust: replies are checked by pymodbus (CRC, framing) and then here (unit,
function, register count).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Protocol

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from drivers.modbus import codec
from drivers.modbus.options import BusSettings

_log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
# pymodbus's own response timeout; ours (per device, at most 60 s plus wire time) cancels first
_CLIENT_TIMEOUT_S = 120.0


class LinkError(Exception):
    """A transaction failed; the message is the reason shown in the driver's state."""


class LinkDown(LinkError):
    """The serial port cannot be opened, or the TCP connection is lost or refused."""


class ExceptionReply(LinkError):
    """The device answered with a Modbus exception."""

    def __init__(self, code: int) -> None:
        super().__init__(codec.exception_text(code))
        self.code = code


class NoReply(LinkError):
    """The device did not answer within its timeout (dead, slow, or a garbled request or reply)."""


class BadReply(LinkError):
    """An answer that does not match the request (wrong unit, function or length)."""


class Link(Protocol):
    """One client on one bus. Calls are never concurrent: the bus serialises them."""

    @property
    def is_open(self) -> bool: ...

    async def open(self) -> None:
        """Open the port or connect; LinkDown with the reason if it cannot."""
        ...

    def close(self) -> None: ...

    async def read(self, unit: int, function: int, start: int, count: int) -> list[int]:
        """Read `count` registers (function 3 or 4); LinkError subclasses on failure."""
        ...

    async def write(self, unit: int, address: int, value: int) -> None:
        """Write one holding register (function 6)."""
        ...


class PymodbusLink:
    """`Link` over pymodbus's asyncio serial (RTU) or TCP client."""

    def __init__(self, settings: BusSettings) -> None:
        self._settings = settings
        self._client: AsyncModbusSerialClient | AsyncModbusTcpClient | None = None

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self) -> None:
        self.close()
        s = self._settings
        client: AsyncModbusSerialClient | AsyncModbusTcpClient
        if s.is_tcp:
            client = AsyncModbusTcpClient(
                s.host, port=s.tcp_port, name=s.port, timeout=_CLIENT_TIMEOUT_S, retries=0,
                reconnect_delay=0,
            )  # fmt: skip
        else:
            if _missing(s.port):
                raise LinkDown(f"cannot open {s.port}: no such device")
            client = AsyncModbusSerialClient(
                s.port, name=s.port, baudrate=s.baud, bytesize=8, parity=s.parity,
                stopbits=s.stop_bits, timeout=_CLIENT_TIMEOUT_S, retries=0, reconnect_delay=0,
            )  # fmt: skip
        what = "connect to" if s.is_tcp else "open"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                connected = await client.connect()
                _resume_cancellation()
        except TimeoutError:
            client.close()
            raise LinkDown(f"cannot {what} {s.port}: timed out") from None
        if not connected:
            client.close()
            raise LinkDown(f"cannot {what} {s.port} (refused, missing or in use)")
        # a device that stays silent must not make pymodbus drop the connection on its own
        client.set_max_no_responses(1 << 30)
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _require(self) -> AsyncModbusSerialClient | AsyncModbusTcpClient:
        if self._client is None or not self._client.connected:
            raise LinkDown(f"{self._settings.port} is not open")
        return self._client

    async def read(self, unit: int, function: int, start: int, count: int) -> list[int]:
        client = self._require()
        try:
            if function == codec.READ_HOLDING:
                reply = await client.read_holding_registers(start, count=count, device_id=unit)
            else:
                reply = await client.read_input_registers(start, count=count, device_id=unit)
            _resume_cancellation()
        except ConnectionException as exc:
            raise LinkDown(str(exc)) from None
        except ModbusException as exc:
            raise BadReply(str(exc)) from None
        _check(reply, unit)
        registers = list(reply.registers)
        if len(registers) != count:
            raise BadReply(f"asked for {count} registers, got {len(registers)}")
        return registers

    async def write(self, unit: int, address: int, value: int) -> None:
        client = self._require()
        try:
            reply = await client.write_register(address, value, device_id=unit)
            _resume_cancellation()
        except ConnectionException as exc:
            raise LinkDown(str(exc)) from None
        except ModbusException as exc:
            raise BadReply(str(exc)) from None
        _check(reply, unit)


def _resume_cancellation() -> None:
    """Raise the cancellation pymodbus may have dropped.

    pymodbus awaits with `asyncio.wait_for`, which on Python 3.11 returns the
    result and drops the CancelledError when a cancellation arrives just as
    the reply does; the task then still counts the request (`cancelling()`).
    Without this a stopped driver could go on polling. Inside an
    `asyncio.timeout` block whose own deadline caused it, the timeout turns it
    into TimeoutError as usual.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _missing(path: str) -> bool:
    """True if no device file is at `path` (a stat: quick enough to do inside the loop)."""
    return not os.path.exists(path)


def _check(reply: ModbusPDU, unit: int) -> None:
    if reply.isError():
        raise ExceptionReply(int(getattr(reply, "exception_code", 0)))
    if unit and reply.dev_id != unit:
        raise BadReply(f"answer from unit {reply.dev_id}, expected {unit}")
