"""Types shared by every driver family and the agent that runs them.

A driver turns bytes from a device into `Reading`s and hands them to an
`Emit` callback; it never imports the agent. Nothing here does I/O. Codecs do
not use this module (they must also run on MicroPython): they return plain
``(quantity, unit, value)`` tuples and the driver stamps them into readings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: time quality of a reading's timestamp
TIME_SYNCED = 0  # unix seconds from a trusted wall clock (agent.clock)
TIME_UNSYNCED = 1  # CLOCK_BOOTTIME seconds of this boot: the wall clock was not set yet
TIME_BEFORE = 2  # from an earlier boot whose clock was never set; time: an upper bound


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one quantity from one sensor at one time (DESIGN.md §2, §5)."""

    sensor: str
    quantity: str
    value: float
    unit: str
    time: float  # unix seconds (boot-clock seconds while time_quality is TIME_UNSYNCED)
    time_quality: int = TIME_SYNCED


Emit = Callable[[Sequence[Reading]], None]


class OptionError(ValueError):
    """A driver option in the config is wrong; `key` is the option name within the sensor table."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class DriverState:
    """What a driver says about itself, for logs, health and the doctor."""

    available: bool = False
    reason: str = "not started"
    counters: Mapping[str, int] = field(default_factory=dict)


class Driver(Protocol):
    """A running device binding. `run` returns only when cancelled."""

    sensor_id: str

    async def run(self, emit: Emit) -> None: ...

    def state(self) -> DriverState: ...


#: what a codec returns for one frame: (quantity, unit, value) records (DESIGN.md §5 names)
Record = tuple[str, str, float]


@dataclass(frozen=True, slots=True)
class Decoded:
    """One frame decoded for `citygate decode`: records, and a note for a valid frame that
    carries no measurement (e.g. "no echo", "warming up", "duplicate"), else ""."""

    records: list[Record]
    note: str = ""


class DriverFamily(Protocol):
    """What the registry knows about a device family (one folder under drivers/)."""

    name: str

    def parse_options(self, sensor_id: str, table: Mapping[str, Any]) -> object:
        """Validate the sensor's config table; raise OptionError naming the key."""
        ...

    def create(self, sensor_id: str, options: object) -> Driver: ...

    def decode(self, data: bytes, params: Mapping[str, str]) -> Decoded:
        """Decode one complete frame (or advertisement payload, or Modbus reply).

        `params` carries what some codecs need besides the bytes, from
        `citygate decode` options: "mac" and "key" (encrypted BTHome), "profile"
        (Modbus register map). Raise ValueError (the codec's own subclass is
        fine) with a reason for a bad frame or a missing parameter.
        """
        ...
