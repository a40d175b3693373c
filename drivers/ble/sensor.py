"""The driver side common to BLE sensor families: one address, fed by the shared scanner.

`BleSensorDriver` attaches to the adapter's shared scanner for its address,
asks the family's `PayloadFilter` what each advertisement means (a new
measurement, a repeat of one already seen, or something to reject), emits
the readings of new measurements, and keeps the sensor's availability:
available while valid advertisements keep coming, unavailable with a reason
when the scanner cannot run, when rejections are all that arrive, or after
`silence_timeout_s` without a valid advertisement (trigger-based devices,
which advertise only on events, are exempt from the silence rule).

Also here: option parsing shared by the BLE families (`parse_address`,
`parse_seconds`).

Trust: advertisements are judged by the family filter; this module trusts
its verdicts. The config table is unverified until the parse functions
accept it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from drivers.base import DriverState, Emit, OptionError, Reading, Record
from drivers.ble import hub
from drivers.ble.scanner import DEFAULT_ADAPTER, Advertisement

_log = logging.getLogger(__name__)

NEW, REPEAT, REJECTED, IGNORED = "new", "repeat", "rejected", "ignored"
REJECTION_LOG_INTERVAL_S = 60.0  # rejections are counted each, logged at most this often
_HEX = "0123456789ABCDEF"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a family filter makes of one advertisement.

    NEW: a measurement not seen before (its records may be empty when every
    field was "not available"); REPEAT: the device is alive but says nothing
    new; REJECTED: unusable (`reason` says why; the filter counts it); IGNORED: carries
    nothing of this family (e.g. a scan response with only a name), neither life nor fault.
    `irregular` marks a trigger-based device that may stay silent for long.
    """

    kind: str
    records: tuple[Record, ...] = ()
    reason: str = ""
    irregular: bool = False


def new(records: list[Record], *, irregular: bool = False) -> Verdict:
    return Verdict(NEW, tuple(records), irregular=irregular)


def repeat(*, irregular: bool = False) -> Verdict:
    return Verdict(REPEAT, irregular=irregular)


def rejected(reason: str) -> Verdict:
    return Verdict(REJECTED, reason=reason)


def ignored() -> Verdict:
    return Verdict(IGNORED)


class PayloadFilter(Protocol):
    """A family's judgement of its device's advertisements, with its own counters."""

    def judge(self, adv: Advertisement) -> Verdict: ...

    def counters(self) -> dict[str, int]: ...


# -- options -------------------------------------------------------------------------------


def parse_address(value: object, key: str = "address") -> str:
    """A Bluetooth address as BlueZ writes it: six hex pairs, upper case, ':' between."""
    if not isinstance(value, str):
        raise OptionError(key, f"must be a Bluetooth address string, got {type(value).__name__}")
    text = value.strip().upper().replace("-", ":")
    pairs = text.split(":") if ":" in text else [text[i : i + 2] for i in range(0, len(text), 2)]
    if len(pairs) != 6 or any(len(p) != 2 or p[0] not in _HEX or p[1] not in _HEX for p in pairs):
        raise OptionError(key, f"must look like AA:BB:CC:DD:EE:FF, got {value!r}")
    return ":".join(pairs)


def parse_seconds(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(key, f"must be a number of seconds, got {type(value).__name__}")
    if not low <= value <= high:
        raise OptionError(key, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def check_known(family: str, sensor_id: str, table: Mapping[str, object], known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise OptionError(key, f"unknown option for {family} sensor {sensor_id!r}")


# -- the driver ------------------------------------------------------------------------------


class BleSensorDriver:
    """One BLE sensor; `run` returns only when cancelled (or when `emit` raises)."""

    def __init__(
        self,
        sensor_id: str,
        address: str,
        silence_timeout_s: float,
        payloads: PayloadFilter,
        *,
        adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        self.sensor_id = sensor_id
        self.address = address
        self.silence_timeout_s = silence_timeout_s
        self.adapter = adapter
        self._payloads = payloads
        self._available = False
        self._reason = "not started"
        self._scanning = False
        self._irregular = False
        self._silent = False
        self._last_valid = 0.0  # loop.time() of the last valid advert (or of the scan start)
        self._emit: Emit | None = None
        self._failure: BaseException | None = None
        self._wake: asyncio.Event | None = None
        self._logged_reason = ""
        self._quiet_until = 0.0  # no rejection is logged before then (counters count them all)
        self._last_rejection = ""

    def state(self) -> DriverState:
        return DriverState(self._available, self._reason, self._payloads.counters())

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        self._emit, self._failure, self._wake = emit, None, asyncio.Event()
        self._last_valid = loop.time()
        try:
            async with hub.attach(self.address, self, self.adapter):
                while True:
                    if self._failure is not None:
                        raise self._failure
                    now = loop.time()
                    self._check_silence(now)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(self._next_check(now) - now, 0.05)):
                            await self._wake.wait()
                    self._wake.clear()
        finally:
            self._emit = self._wake = None
            self._available, self._reason = False, "stopped"

    # -- the scanner's callbacks (Listener) -------------------------------------------------

    def on_scanner_state(self, scanning: bool, reason: str) -> None:
        self._scanning = scanning
        if not scanning:
            self._set_unavailable(reason, log=self._available)
            return
        self._last_valid = asyncio.get_running_loop().time()  # the silence clock restarts
        self._silent = False
        if not self._available:
            self._reason = f"waiting for advertisements from {self.address}"

    def on_advertisement(self, adv: Advertisement) -> None:
        verdict = self._payloads.judge(adv)
        if verdict.kind == IGNORED:
            return
        if verdict.kind == REJECTED:
            self._rejected(verdict.reason)
            return
        self._last_valid = asyncio.get_running_loop().time()
        self._irregular = verdict.irregular
        self._silent = False
        self._last_rejection = ""
        if not self._available:
            _log.info("%s: receiving advertisements from %s", self.sensor_id, self.address)
            self._logged_reason, self._quiet_until = "", 0.0
        self._available, self._reason = True, "ok"
        if verdict.kind == NEW and verdict.records and self._emit is not None:
            stamp = time.time()
            batch = [Reading(self.sensor_id, q, v, u, stamp) for q, u, v in verdict.records]
            try:
                self._emit(batch)
            except Exception as exc:  # a failing emit must end run(), not vanish in the scanner
                self._fail(exc)

    # -- internals --------------------------------------------------------------------------

    def _rejected(self, reason: str) -> None:
        now = asyncio.get_running_loop().time()
        if reason != self._logged_reason and now >= self._quiet_until:
            _log.warning("%s: advertisement rejected: %s", self.sensor_id, reason)
            self._logged_reason, self._quiet_until = reason, now + REJECTION_LOG_INTERVAL_S
        self._last_rejection = reason
        if self._silent:
            self._reason = self._silence_reason()
        elif not self._available:
            self._reason = reason

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        if self._wake is not None:
            self._wake.set()

    def _next_check(self, now: float) -> float:
        if self._silent or not self._scanning or (self._available and self._irregular):
            return now + self.silence_timeout_s
        return self._last_valid + self.silence_timeout_s

    def _check_silence(self, now: float) -> None:
        if self._silent or not self._scanning or (self._available and self._irregular):
            return
        if now - self._last_valid < self.silence_timeout_s:
            return
        self._silent = True
        self._set_unavailable(self._silence_reason(), log=True)

    def _silence_reason(self) -> str:
        reason = f"no valid advertisement for {self.silence_timeout_s:g} s"
        if self._last_rejection:
            reason = f"{reason} (last rejected: {self._last_rejection})"
        return reason

    def _set_unavailable(self, reason: str, *, log: bool) -> None:
        if log:
            _log.warning("%s: unavailable: %s", self.sensor_id, reason)
        self._available, self._reason = False, reason
