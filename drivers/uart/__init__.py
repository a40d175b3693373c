"""What every serial sensor family shares: the host-side port owner and the pty emulator base.

Not a device family (no codec): families such as pms5003 build on it. See README.md.
"""

from drivers.uart import options
from drivers.uart.device import BITS_PER_BYTE, PtyDevice, wire_time_s
from drivers.uart.host import (
    BaseProtocol,
    LineProtocol,
    LinkLost,
    SerialDriver,
    SerialLink,
    SerialSettings,
    next_backoff,
)

__all__ = [
    "BITS_PER_BYTE",
    "BaseProtocol",
    "LineProtocol",
    "LinkLost",
    "PtyDevice",
    "SerialDriver",
    "SerialLink",
    "SerialSettings",
    "next_backoff",
    "options",
    "wire_time_s",
]
