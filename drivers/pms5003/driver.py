"""Bind the PMS5003 codec to a serial port and a schedule under asyncio.

The driver opens the port with pyserial (8N1, no flow control), watches its
file descriptor with `loop.add_reader` (no thread, no busy loop), sets the
configured mode, polls in passive mode, and turns each valid frame into
readings. A lost port is reopened with exponential backoff; a port that
delivers nothing is reported unavailable until the next frame.

Trust: the config table is unverified until `parse_options` accepts it; the
bytes from the port are unverified until the codec accepts a frame. The port's
existence is not checked here (the config layer does that).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import serial

from drivers.base import Decoded, Driver, DriverState, Emit, OptionError, Reading
from drivers.pms5003 import codec

_log = logging.getLogger(__name__)

MODES = ("active", "passive")
BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
_READ_CHUNK = 512


@dataclass(frozen=True, slots=True)
class Pms5003Options:
    """Validated settings of one PMS5003 (see README.md, "Settings")."""

    port: str
    baud: int = 9600
    mode: str = "active"
    poll_interval_s: float = 2.3
    silence_timeout_s: float = 10.0


def _number(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(key, f"must be a number of seconds, got {type(value).__name__}")
    if not low <= value <= high:
        raise OptionError(key, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _port(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError("port", "must be a non-empty device path such as /dev/ttyAMA0")
    return value


def _baud(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError("baud", f"must be an integer, got {type(value).__name__}")
    if value not in BAUD_RATES:
        raise OptionError("baud", f"must be one of {list(BAUD_RATES)} (the sensor uses 9600)")
    return value


def _mode(value: object) -> str:
    if value not in MODES:
        raise OptionError("mode", f'must be "active" or "passive", got {value!r}')
    return str(value)


def parse_options(sensor_id: str, table: Mapping[str, Any]) -> Pms5003Options:
    """Validate one `[sensors.<id>]` table; raise OptionError naming the offending key."""
    known = {"driver", "port", "baud", "mode", "poll_interval_s", "silence_timeout_s"}
    for key in table:
        if key not in known:
            raise OptionError(key, f"unknown option for pms5003 sensor {sensor_id!r}")
    if "port" not in table:
        raise OptionError("port", "missing: the serial device the sensor is wired to")
    defaults = Pms5003Options(port="")
    options = Pms5003Options(
        port=_port(table["port"]),
        baud=_baud(table.get("baud", defaults.baud)),
        mode=_mode(table.get("mode", defaults.mode)),
        poll_interval_s=_number(
            "poll_interval_s", table.get("poll_interval_s", defaults.poll_interval_s), 0.1, 3600
        ),
        silence_timeout_s=_number(
            "silence_timeout_s",
            table.get("silence_timeout_s", defaults.silence_timeout_s),
            0.5,
            3600,
        ),
    )
    if options.mode == "passive" and options.silence_timeout_s <= options.poll_interval_s:
        raise OptionError("silence_timeout_s", "must be longer than poll_interval_s")
    return options


def next_backoff(delay: float) -> float:
    """The wait after `delay`: doubled, capped at BACKOFF_MAX_S."""
    return min(delay * 2, BACKOFF_MAX_S)


class _LinkLost(Exception):
    """The port hung up or failed; the message is the reason shown in state()."""


class Pms5003Driver:
    """One PMS5003 on one serial port; `run` returns only when cancelled."""

    def __init__(self, sensor_id: str, options: Pms5003Options) -> None:
        self.sensor_id = sensor_id
        self._options = options
        self._parser = codec.StreamParser()
        self._available = False
        self._reason = "not started"
        self._reopens = 0
        self._opened_once = False
        self._silent = False
        self._last_frame = 0.0  # loop.time() of the last frame (or of the open)

    def state(self) -> DriverState:
        p = self._parser
        counters = {
            "frames": p.frames,
            "bad_frames": p.bad_frames,
            "bad_bytes": p.bad_bytes,
            "acks": p.acks,
            "reopens": self._reopens,
        }
        return DriverState(available=self._available, reason=self._reason, counters=counters)

    async def run(self, emit: Emit) -> None:
        delay = BACKOFF_INITIAL_S
        try:
            while True:
                frames_before = self._parser.frames
                try:
                    port = self._open()
                except (serial.SerialException, OSError) as exc:
                    self._set_unavailable(f"cannot open {self._options.port}: {exc}")
                else:
                    try:
                        await self._session(port, emit)
                    except (_LinkLost, serial.SerialException, OSError) as exc:
                        self._set_unavailable(f"port lost: {exc}")
                    finally:
                        port.close()
                if self._parser.frames > frames_before:
                    delay = BACKOFF_INITIAL_S
                _log.info("%s: retrying %s in %.1f s", self.sensor_id, self._options.port, delay)
                await asyncio.sleep(delay)
                delay = next_backoff(delay)
        finally:
            self._available = False
            self._reason = "stopped"

    def _open(self) -> serial.Serial:
        opts = self._options
        port = serial.Serial(
            opts.port,
            opts.baud,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            timeout=0,
            xonxoff=False,
            rtscts=False,
            # one owner per port: a second poller (another agent, a stray minicom) is refused
            exclusive=True,
        )
        if self._opened_once:
            self._reopens += 1
        self._opened_once = True
        self._parser.reset()
        _log.info("%s: opened %s (%s mode)", self.sensor_id, opts.port, opts.mode)
        return port

    async def _session(self, port: serial.Serial, emit: Emit) -> None:
        """Serve one open port until it fails (raises) or the task is cancelled."""
        loop = asyncio.get_running_loop()
        fd = port.fileno()
        lost: asyncio.Future[None] = loop.create_future()
        self._last_frame = loop.time()
        self._silent = False
        loop.add_reader(fd, self._on_readable, fd, lost, emit)
        try:
            passive = self._options.mode == "passive"
            _write(fd, codec.PASSIVE_MODE if passive else codec.ACTIVE_MODE)
            next_poll = loop.time()
            while not lost.done():
                now = loop.time()
                if passive and now >= next_poll:
                    _write(fd, codec.PASSIVE_READ)
                    next_poll = now + self._options.poll_interval_s
                self._check_silence(now)
                wake = self._next_silence_check(now)
                if passive:
                    wake = min(wake, next_poll)
                await asyncio.wait([lost], timeout=max(wake - now, 0.01))
            lost.result()  # raises the reason the reader recorded
        finally:
            loop.remove_reader(fd)
            if not lost.done():
                lost.cancel()
            elif not lost.cancelled():
                lost.exception()  # mark it retrieved when cancellation wins the race

    def _on_readable(self, fd: int, lost: asyncio.Future[None], emit: Emit) -> None:
        if lost.done():
            return
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            reason = "hung up" if exc.errno == errno.EIO else f"read failed: {exc}"
            lost.set_exception(_LinkLost(reason))
            return
        if not data:
            lost.set_exception(_LinkLost("hung up (end of file)"))
            return
        try:
            self._deliver(self._parser.feed(data), emit)
        except Exception as exc:  # a failing emit must end run(), not vanish in the loop
            lost.set_exception(exc)

    def _deliver(self, frames: list[list[tuple[str, str, float]]], emit: Emit) -> None:
        if not frames:
            return
        self._last_frame = asyncio.get_running_loop().time()
        if not self._available:
            _log.info("%s: receiving frames", self.sensor_id)
        self._available = True
        self._silent = False
        self._reason = "ok"
        for records in frames:
            stamp = time.time()
            emit([Reading(self.sensor_id, q, value, unit, stamp) for q, unit, value in records])

    def _next_silence_check(self, now: float) -> float:
        timeout = self._options.silence_timeout_s
        if self._silent:  # already reported: look again later, the next frame clears it
            return now + timeout
        return self._last_frame + timeout

    def _check_silence(self, now: float) -> None:
        timeout = self._options.silence_timeout_s
        if self._silent or now - self._last_frame < timeout:
            return
        self._silent = True
        self._set_unavailable(f"silent for {timeout:g} s")

    def _set_unavailable(self, reason: str) -> None:
        self._available = False
        self._reason = reason
        _log.warning("%s: unavailable: %s", self.sensor_id, reason)


def _write(fd: int, data: bytes) -> None:
    """Send one command; the fd is non-blocking and a UART always drains, so a short write
    means the port is stuck."""
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    if sent != len(data):
        raise _LinkLost(f"output stalled ({sent} of {len(data)} bytes written)")


class Pms5003Family:
    """The registry's view of the family: option parsing, construction, one-frame decoding."""

    name = "pms5003"

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> Pms5003Options:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, Pms5003Options):
            raise TypeError(f"expected Pms5003Options, got {type(options).__name__}")
        return Pms5003Driver(sensor_id, options)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        return Decoded(codec.decode_frame(data))
