"""Bluetooth Low Energy plumbing shared by the BLE sensor families (ruuvi, bthome).

Not a family itself: one shared scanner per adapter (`hub.attach`, reference
counted), the generic advertisement-driven driver (`BleSensorDriver`), the
unknown-device hook for the gateway's sensor inventory
(`set_unknown_listener`), and, for tests and demos, a mock BlueZ on a private
D-Bus (`drivers.ble.mockbluez.MockBlueZ`) with an emulator base class
(`drivers.ble.emulation.AdvertisingEmulator`).
"""

from drivers.ble.hub import active_scanner, attach, set_unknown_listener, unknown_listener
from drivers.ble.repeats import RepeatFilter
from drivers.ble.scanner import (
    BTHOME_UUID,
    DEFAULT_ADAPTER,
    RUUVI_COMPANY_ID,
    Advertisement,
    Listener,
    SharedScanner,
    UnknownListener,
    classify,
)
from drivers.ble.sensor import BleSensorDriver, PayloadFilter, Verdict, parse_address

__all__ = [
    "BTHOME_UUID",
    "DEFAULT_ADAPTER",
    "RUUVI_COMPANY_ID",
    "Advertisement",
    "BleSensorDriver",
    "Listener",
    "PayloadFilter",
    "RepeatFilter",
    "SharedScanner",
    "UnknownListener",
    "Verdict",
    "active_scanner",
    "attach",
    "classify",
    "parse_address",
    "set_unknown_listener",
    "unknown_listener",
]
