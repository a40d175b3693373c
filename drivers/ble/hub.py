"""The gateway's BLE scanners: one per adapter, shared by every BLE driver, reference-counted.

A BLE driver's `run()` enters `attach(address, listener)`: the first one
creates and starts the adapter's `SharedScanner`, later ones join it, and
when the last one leaves (its task is cancelled) the scanner is stopped and
forgotten. Nothing outlives the drivers that use it, so consecutive event
loops (tests, restarts) each get a fresh scanner.

The one piece of process-wide configuration is the unknown-device listener:
the agent calls `set_unknown_listener(fn)` once, and `fn(address, kind, rssi)`
is then called on the event loop for BLE devices that look like a known
sensor family ("ruuvi", "bthome") but are not in the config, at most once a
minute per address. It must be quick and must not block; exceptions are
logged and ignored. Pass None to remove it.

Trust: addresses come from the config (normalised by the families); the
listener is trusted code of the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from drivers.ble.scanner import DEFAULT_ADAPTER, Listener, SharedScanner, UnknownListener

_scanners: dict[str, SharedScanner] = {}
_closing: dict[str, asyncio.Task[None]] = {}
_unknown_listener: UnknownListener | None = None


def set_unknown_listener(listener: UnknownListener | None) -> UnknownListener | None:
    """Install the listener for unadopted BLE sensors (None removes it); returns the previous."""
    global _unknown_listener  # the one process-wide hook, by design
    previous, _unknown_listener = _unknown_listener, listener
    return previous


def unknown_listener() -> UnknownListener | None:
    return _unknown_listener


def active_scanner(adapter: str = DEFAULT_ADAPTER) -> SharedScanner | None:
    """The adapter's running scanner, if any driver is attached (for health and tests)."""
    return _scanners.get(adapter)


@contextlib.asynccontextmanager
async def attach(
    address: str, listener: Listener, adapter: str = DEFAULT_ADAPTER
) -> AsyncIterator[SharedScanner]:
    """Receive `address`'s advertisements in `listener` for the duration of the block."""
    loop = asyncio.get_running_loop()
    while (closing := _closing.get(adapter)) is not None:
        if closing.done() or closing.get_loop() is not loop:
            _closing.pop(adapter, None)  # finished, or left over from a loop that has ended
            break
        await asyncio.shield(closing)  # the previous scanner must be stopped before a new one
    scanner = _scanners.get(adapter)
    if scanner is not None and not scanner.bound_to(loop):
        scanner = None  # its loop has ended, and its task with it
    if scanner is None:
        scanner = _scanners[adapter] = SharedScanner(adapter, unknown=unknown_listener)
        scanner.start()
    scanner.add(address, listener)
    try:
        yield scanner
    finally:
        scanner.remove(address, listener)
        if not scanner.listening() and _scanners.get(adapter) is scanner:
            scanner.retire()
            del _scanners[adapter]
            closing = loop.create_task(scanner.close(), name=f"ble-scanner-{adapter}-close")
            _closing[adapter] = closing
            closing.add_done_callback(lambda task: _forget_closing(adapter, task))
            await asyncio.shield(closing)


def _forget_closing(adapter: str, task: asyncio.Task[None]) -> None:
    if _closing.get(adapter) is task:
        del _closing[adapter]
