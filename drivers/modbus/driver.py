"""The generic Modbus driver: poll one device's register map on a shared bus, every period.

Each configured sensor is one `ModbusDriver`. Its `run` takes the bus for its
`port` from the family's `BusRegistry` (several sensors on one port share one
bus and its scheduler), then polls on a fixed period: the optional trigger
write, then the profile's planned reads, each decoded with the profile's
fields. One poll becomes one batch of readings with one time stamp.

Per poll:
- a read answered with an exception (illegal address, busy after retries)
  loses only the fields of that register group; the others are published;
- a read with no answer ends the poll (the device is not there; its other
  groups are not tried, so a dead device costs the bus one timeout and its
  retries per period);
- a status field with an error bit set, or the warm-up time after the device
  first answered, means no reading: counted, never published;
- NaN or infinite values are left out and counted.

Polls keep to a fixed grid of ticks: a poll that overran delays the next
one (which then starts at once) without losing it; only whole periods
missed are skipped, never caught up in a burst. A device that leaves
several polls in a row unanswered is polled with a backoff on the same grid
(every 2nd, 4th, 8th ... tick, at most every 30 s), so that a dead device
does not keep taking the bus from the live ones; any answer ends it.

Trust: options are checked by `drivers.modbus.options`; register values are
checked by pymodbus (CRC), `drivers.modbus.link` (shape) and the codec.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from drivers.base import Decoded, Driver, DriverState, Emit, Reading, Record
from drivers.modbus import codec
from drivers.modbus.bus import Bus, BusConflict, BusRegistry, Device
from drivers.modbus.decoding import decode_block, decode_frames
from drivers.modbus.link import BadReply, ExceptionReply, LinkDown, LinkError, NoReply
from drivers.modbus.options import ModbusOptions, parse_options
from drivers.modbus.profile import Read, load_profile

_log = logging.getLogger(__name__)

_COUNTERS = (
    "polls", "readings", "no_answer", "exceptions", "bad_replies", "link_down",
    "status_rejected", "warmup", "invalid_values", "polls_skipped",
)  # fmt: skip
#: the longest wait between polls of a device that does not answer
BACKOFF_MAX_S = 30.0


class ModbusDriver:
    """One Modbus device on a shared bus; `run` returns only when cancelled."""

    def __init__(self, sensor_id: str, options: ModbusOptions, buses: BusRegistry) -> None:
        self.sensor_id = sensor_id
        self.options = options
        self._buses = buses
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._device: Device | None = None
        self._available = False
        self._reason = "not started"
        self._first_answer: float | None = None  # loop time the device first answered
        self._unanswered = 0  # polls in a row that got no answer

    def state(self) -> DriverState:
        counters = dict(self._counters)
        if self._device is not None:
            counters.update(self._device.counters)
        return DriverState(available=self._available, reason=self._reason, counters=counters)

    async def run(self, emit: Emit) -> None:
        try:
            bus = self._buses.acquire(self.options.bus)
        except BusConflict as exc:
            self._set(False, str(exc))
            await asyncio.Event().wait()  # a config problem: stay unavailable until stopped
            return
        try:
            profile = self.options.profile
            self._device = bus.attach(
                profile.unit_id, profile.timeout_s, profile.retries, profile.min_idle_s
            )
            loop = asyncio.get_running_loop()
            tick = loop.time()
            while True:
                await self._poll(bus, self._device, emit)
                tick = _next_tick(tick, profile.period_s, loop.time())
                tick += self._back_off() * profile.period_s
                await asyncio.sleep(max(tick - loop.time(), 0.0))
        finally:
            self._buses.release(bus)
            self._available = False
            self._reason = "stopped"

    async def _poll(self, bus: Bus, device: Device, emit: Emit) -> None:
        profile = self.options.profile
        self._counters["polls"] += 1
        records: list[Record] = []
        problems: list[str] = []
        status = ""
        try:
            if profile.trigger is not None:
                await bus.write(device, profile.trigger.address, profile.trigger.value)
                bus.hold(device, profile.trigger.wait_s)
            for read in profile.reads:
                try:
                    registers = await bus.read(device, read.function, read.start, read.count)
                except (ExceptionReply, BadReply) as exc:
                    self._count_group_error(exc)
                    problems.append(f"{_group(read)}: {exc}")
                    continue
                self._answered()
                block = decode_block(read.fields, read.start, registers)
                records.extend(block.records)
                self._counters["invalid_values"] += len(block.invalid)
                problems.extend(f"not a number: {name}" for name in block.invalid)
                status = "; ".join(s for s in (status, block.status) if s)
        except NoReply as exc:
            self._counters["no_answer"] += 1
            self._unanswered += 1
            self._set(False, str(exc))
            return
        except LinkDown as exc:
            self._counters["link_down"] += 1
            self._unanswered = 0  # the bus reopens with its own backoff; then ask at once
            self._set(False, str(exc))
            return
        except LinkError as exc:  # a trigger write answered wrongly
            self._unanswered = 0
            self._count_group_error(exc)
            self._set(False, f"trigger write: {exc}")
            return
        self._unanswered = 0
        self._conclude(records, problems, status, emit)

    def _back_off(self) -> int:
        """Periods to leave out before the next poll; logged and counted."""
        period = self.options.profile.period_s
        skip = polls_to_skip(self._unanswered, period)
        if skip:
            self._counters["polls_skipped"] += skip
            _log.info(
                "%s: no answer %d times in a row; next poll in %.1f s",
                self.sensor_id,
                self._unanswered,
                (skip + 1) * period,
            )
        return skip

    def _conclude(
        self, records: list[Record], problems: list[str], status: str, emit: Emit
    ) -> None:
        if status:
            self._counters["status_rejected"] += 1
            self._set(False, f"no reading: status {status}")
            return
        if self._warming_up():
            self._counters["warmup"] += 1
            self._set(False, "warming up")
            return
        if records:
            stamp = time.time()
            emit([Reading(self.sensor_id, q, value, unit, stamp) for q, unit, value in records])
            self._counters["readings"] += 1
        if problems:
            self._set(bool(records), "; ".join(problems))
        else:
            self._set(True, "ok")

    def _count_group_error(self, exc: LinkError) -> None:
        key = "exceptions" if isinstance(exc, ExceptionReply) else "bad_replies"
        self._counters[key] += 1

    def _answered(self) -> None:
        if self._first_answer is None:
            self._first_answer = asyncio.get_running_loop().time()

    def _warming_up(self) -> bool:
        warmup = self.options.profile.warmup_s
        if warmup <= 0 or self._first_answer is None:
            return False
        return asyncio.get_running_loop().time() - self._first_answer < warmup

    def _set(self, available: bool, reason: str) -> None:
        if (available, reason) != (self._available, self._reason):
            level = logging.INFO if available and reason == "ok" else logging.WARNING
            _log.log(level, "%s: %s", self.sensor_id, reason)
        self._available = available
        self._reason = reason


def _group(read: Read) -> str:
    return f"function {read.function} registers {read.start}-{read.start + read.count - 1}"


def polls_to_skip(unanswered: int, period: float) -> int:
    """Polls to leave out after `unanswered` polls in a row got no answer: none after the
    first (one lost reply is no reason to lose a reading), then 1, 3, 7, ... so that the
    wait doubles, up to BACKOFF_MAX_S (or one period, if that is longer). A device that
    does not answer costs the bus its timeouts on every poll; the others need the bus."""
    if unanswered < 2:
        return 0
    most = max(int(BACKOFF_MAX_S / period), 1)
    return min(1 << min(unanswered - 1, 32), most) - 1


def _next_tick(tick: float, period: float, now: float) -> float:
    """The tick after `tick`: one period later, on the same grid. A poll that overran
    makes the next one start late but not be lost; whole periods behind are skipped."""
    tick += period
    if now - tick >= period:
        tick += period * int((now - tick) / period)
    return tick


class ModbusFamily:
    """The registry's view: option parsing, drivers sharing one bus per port, decoding."""

    name = "modbus"

    def __init__(self, buses: BusRegistry | None = None) -> None:
        self.buses = buses if buses is not None else BusRegistry()

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> ModbusOptions:
        return parse_options(sensor_id, table)

    def create(self, sensor_id: str, options: object) -> Driver:
        if not isinstance(options, ModbusOptions):
            raise TypeError(f"expected ModbusOptions, got {type(options).__name__}")
        return ModbusDriver(sensor_id, options, self.buses)

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        """Without a profile: the raw frame (codec.decode). With "profile" (a shipped name or a
        TOML file): readings from one reply ADU, or from a request followed by its reply."""
        name = params.get("profile")
        if name is None:
            return Decoded(codec.decode(data))
        return decode_frames(data, load_profile(name))
