"""One bleak scanner per Bluetooth adapter, shared by every BLE sensor of the gateway.

`SharedScanner` runs a single `BleakScanner` (active scanning) and hands each
advertisement to the listeners registered for its address. Advertisements
from addresses nobody listens to are classified by the identifiers BLE sensor
families use (Ruuvi: manufacturer data of company 0x0499; BTHome: service
data of UUID 0xFCD2) and reported, at most once a minute per address, to the
`unknown` callback, so that the gateway can list them for adoption.

The scanner is a background task: it starts bleak, and when that fails
(no D-Bus system bus, BlueZ not running, adapter missing or powered off) it
tells every listener why and retries with exponential backoff. When no
advertisement at all has arrived for `idle_restart_s` it restarts the scan,
since BlueZ is known to stop delivering without saying so.

Trust: advertisements are unverified radio data: an address is a claim, not
an identity, and payloads are passed on as bytes for the families' codecs to
judge. bleak and dbus_fast are trusted libraries; whatever they raise while
starting or stopping is turned into a reason string here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

_log = logging.getLogger(__name__)

RUUVI_COMPANY_ID = 0x0499
BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
DEFAULT_ADAPTER = "hci0"
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
IDLE_RESTART_S = 120.0
UNKNOWN_REPORT_INTERVAL_S = 60.0
_UNKNOWN_MEMORY = 4096  # addresses remembered for rate limiting (random addresses churn)
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Advertisement:
    """What BlueZ currently holds for one device, delivered when an advertisement arrived.

    `manufacturer_data` is keyed by company id with the id bytes removed;
    `service_data` by the 128-bit UUID string with the UUID bytes removed
    (bleak's conventions). Both keep the last value BlueZ saw for each key,
    so the same payload can arrive again with only a new `rssi`.
    """

    address: str
    rssi: int
    manufacturer_data: Mapping[int, bytes]
    service_data: Mapping[str, bytes]
    name: str | None = None


class Listener(Protocol):
    """A consumer of one address's advertisements (a BLE sensor driver). Both methods run
    on the event loop and must return quickly without raising."""

    def on_advertisement(self, adv: Advertisement) -> None: ...

    def on_scanner_state(self, scanning: bool, reason: str) -> None: ...


#: on_unknown(address, kind, rssi): an unadopted device that looks like sensor family `kind`
UnknownListener = Callable[[str, str, int], None]


def classify(adv: Advertisement) -> str | None:
    """The sensor family an advertisement looks like ("ruuvi", "bthome"), or None."""
    if RUUVI_COMPANY_ID in adv.manufacturer_data:
        return "ruuvi"
    if BTHOME_UUID in adv.service_data:
        return "bthome"
    return None


def next_backoff(delay: float) -> float:
    """The wait after `delay`: doubled, capped at BACKOFF_MAX_S."""
    return min(delay * 2, BACKOFF_MAX_S)


def describe_failure(exc: BaseException, adapter: str) -> str:
    """A technician's reason for a scanner that would not start."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"no D-Bus system bus ({text})"
    if "ServiceUnknown" in text or "org.bluez was not provided" in text:
        return "BlueZ is not running (no org.bluez on the system bus)"
    if "not found" in text and adapter in text:
        return f"Bluetooth adapter {adapter} not found"
    return f"cannot scan on {adapter}: {text}"


class SharedScanner:
    """The scanner of one adapter; listeners are added and removed by address.

    `start()` launches the background task on the running loop; `close()`
    stops bleak and ends the task. The registry in `drivers.ble.hub` owns
    instances and reference-counts them; tests may also use one directly.
    """

    def __init__(
        self,
        adapter: str = DEFAULT_ADAPTER,
        *,
        unknown: Callable[[], UnknownListener | None] = lambda: None,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        idle_restart_s: float = IDLE_RESTART_S,
    ) -> None:
        self.adapter = adapter
        self._unknown = unknown
        self._backoff_initial_s = backoff_initial_s
        self._idle_restart_s = idle_restart_s
        self._listeners: dict[str, list[Listener]] = {}
        self._reported: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scanning = False
        self._retired = False
        self._reason = "not started"
        self._last_advertisement = 0.0
        self.advertisements = 0
        self.unknown_reports = 0
        self.start_failures = 0
        self.restarts = 0

    # -- listeners ----------------------------------------------------------------------

    def add(self, address: str, listener: Listener) -> None:
        """Deliver `address`'s advertisements to `listener`; it learns the state at once."""
        self._listeners.setdefault(address.upper(), []).append(listener)
        listener.on_scanner_state(self._scanning, self._reason)

    def remove(self, address: str, listener: Listener) -> None:
        entries = self._listeners.get(address.upper(), [])
        if listener in entries:
            entries.remove(listener)
        if not entries:
            self._listeners.pop(address.upper(), None)

    def listening(self) -> bool:
        return bool(self._listeners)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def scanning(self) -> bool:
        return self._scanning

    @property
    def reason(self) -> str:
        return self._reason

    def bound_to(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether this scanner runs (or can run) on `loop`."""
        return self._loop is None or (self._loop is loop and not loop.is_closed())

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"ble-scanner-{self.adapter}")

    def retire(self) -> None:
        """Dispatch nothing more (the last listener has left; `close` follows)."""
        self._retired = True

    async def close(self) -> None:
        """Stop scanning and end the task (idempotent)."""
        self.retire()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._scanning = False
        self._reason = "stopped"

    # -- the scan loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._backoff_initial_s
        while True:
            try:
                scanner = await self._start_bleak()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # bleak and dbus_fast raise many types: all mean retry
                self.start_failures += 1
                reason = describe_failure(exc, self.adapter)
                self._set_state(False, f"{reason}; retrying in {delay:g} s")
                await asyncio.sleep(delay)
                delay = next_backoff(delay)
                continue
            delay = self._backoff_initial_s
            _log.info("scanning for BLE advertisements on %s", self.adapter)
            self._set_state(True, "scanning")
            try:
                await self._watch_idle()
            finally:
                await self._stop_bleak(scanner)
            self.restarts += 1
            self._set_state(
                False, f"no advertisement for {self._idle_restart_s:g} s; restarting the scan"
            )

    async def _start_bleak(self) -> Any:
        from bleak import BleakScanner  # imported here: it pulls in the whole D-Bus stack

        scanner = BleakScanner(
            self._detected, scanning_mode="active", bluez={"adapter": self.adapter}
        )
        await scanner.start()
        self._last_advertisement = asyncio.get_running_loop().time()
        return scanner

    async def _stop_bleak(self, scanner: Any) -> None:
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await scanner.stop()
        except Exception as exc:  # the bus or BlueZ may be gone: nothing to undo
            _log.info("stopping the scan on %s: %s", self.adapter, exc)

    async def _watch_idle(self) -> None:
        """Return when no advertisement has arrived for idle_restart_s."""
        loop = asyncio.get_running_loop()
        while True:
            quiet = loop.time() - self._last_advertisement
            if quiet >= self._idle_restart_s:
                _log.warning("%s: no advertisement for %.0f s", self.adapter, quiet)
                return
            await asyncio.sleep(self._idle_restart_s - quiet)

    def _set_state(self, scanning: bool, reason: str) -> None:
        if (scanning, reason) == (self._scanning, self._reason):
            return
        if not scanning:
            _log.warning("BLE scanner on %s unavailable: %s", self.adapter, reason)
        self._scanning, self._reason = scanning, reason
        for entries in list(self._listeners.values()):
            for listener in list(entries):
                listener.on_scanner_state(scanning, reason)

    # -- dispatch ----------------------------------------------------------------------------

    def _detected(self, device: Any, data: Any) -> None:
        """bleak's detection callback (on the event loop)."""
        self._last_advertisement = asyncio.get_running_loop().time()
        self.advertisements += 1
        adv = Advertisement(
            address=str(device.address).upper(),
            rssi=int(data.rssi),
            manufacturer_data=dict(data.manufacturer_data),
            service_data=dict(data.service_data),
            name=data.local_name,
        )
        self.dispatch(adv)

    def dispatch(self, adv: Advertisement) -> None:
        """Hand `adv` to its listeners, or report it as an unknown sensor."""
        if self._retired:  # adverts still queued on the bus while the scan stops
            return
        listeners = self._listeners.get(adv.address)
        if listeners:
            for listener in list(listeners):
                try:
                    listener.on_advertisement(adv)
                except Exception:  # one listener's bug must not silence the others
                    _log.exception("listener for %s failed", adv.address)
            return
        kind = classify(adv)
        if kind is not None:
            self._report_unknown(adv, kind)

    def _report_unknown(self, adv: Advertisement, kind: str) -> None:
        listener = self._unknown()
        if listener is None:
            return
        now = asyncio.get_running_loop().time()
        last = self._reported.get(adv.address)
        if last is not None and now - last < UNKNOWN_REPORT_INTERVAL_S:
            return
        if len(self._reported) >= _UNKNOWN_MEMORY:
            for address in list(self._reported)[: _UNKNOWN_MEMORY // 2]:
                del self._reported[address]
        self._reported[adv.address] = now
        self.unknown_reports += 1
        try:
            listener(adv.address, kind, adv.rssi)
        except Exception:
            _log.exception("unknown-device listener failed for %s", adv.address)
