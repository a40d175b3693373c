"""One emulated Modbus device: registers with realistic, slowly varying values, and its faults.

`EmulatedDevice` turns a profile into a pymodbus 3.16 `SimDevice` (separate
holding and input register blocks) whose `action` callback refreshes the
values of the registers being read, from seeded random walks: mains voltage
near 230 V, a load current, power and apparent power derived from them,
energy counters that only grow, CO2 between outdoor and stuffy-room levels, a
distance that drifts as a bin fills. Registers the real device has besides
the profile's fields (gap registers, the URM13's configuration) read as their
documented defaults; reserved ranges (the profile's holes) answer exception 02.

Faults, set from any thread: `dead` (no answer at all), `delay_s` (answer
late), `exceptions` (answer reads of a range with an exception code),
`word_order` (send 32-bit values in another order), and `warmup_reads`
(a Senseair S8 after power-up: status "out of range" and 0 ppm).

Trust: requests come from the code under test and are served as a device
would; fault settings are trusted test code.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import threading
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus import codec
from drivers.modbus.profile import Field, Profile, load_profile

# quantity (without a _l1.._l3 suffix) -> (start, step sigma per read, low, high)
_WALKS = {
    "voltage": (230.0, 0.3, 207.0, 253.0),
    "current": (4.0, 0.15, 0.0, 60.0),
    "power_factor": (0.95, 0.005, 0.5, 1.0),
    "frequency": (50.0, 0.005, 49.8, 50.2),
    "co2": (520.0, 6.0, 400.0, 1800.0),
    "distance": (1.6, 0.004, 0.25, 3.0),
    "temperature": (18.0, 0.05, -20.0, 45.0),
}
_DEFAULT_WALK = (50.0, 0.5, 0.0, 100.0)
_SECONDS_PER_READ = 10.0  # how much energy one read adds: as if polled every 10 s

# registers the real devices hold besides the profile's fields: name -> function -> blocks
_DEVICE_MAPS: dict[str, dict[int, list[tuple[int, list[int]]]]] = {
    # Eastron: every input register 0x00-0x4F is a float (0 where the wiring has none)
    "sdm120": {4: [(0x00, [0] * 0x50)], 3: [(0x00, [0] * 0x2A)]},
    "sdm630": {4: [(0x00, [0] * 0x50), (0xC8, [0] * 6)], 3: [(0x00, [0] * 0x2A)]},
    # S8: IR1-IR4, IR22, IR26-IR31; HR1-HR2, HR32 (ABC period 180 h)
    "senseair_s8": {4: [(0, [0] * 4), (21, [0]), (25, [0] * 6)], 3: [(0, [0, 0]), (31, [180])]},
    # URM13: PID, VID, address, baud code, parity/stop, distance, temperatures, config...
    "urm13": {3: [(0x00, [0x0003, 0x0010, 13, 5, 0x0001, 0, 0, 0, 0x0004, 0, 5])]},
}


@dataclass
class _Walk:
    value: float
    sigma: float
    low: float
    high: float

    def step(self, rng: random.Random) -> float:
        self.value = min(max(self.value + rng.gauss(0.0, self.sigma), self.low), self.high)
        return self.value


def _base(quantity: str) -> tuple[str, str]:
    """('voltage', '_l2') for 'voltage_l2'; ('co2', '') for 'co2'."""
    for suffix in ("_l1", "_l2", "_l3"):
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)], suffix
    return quantity, ""


@dataclass
class ExceptionFault:
    """Answer reads of `function` (None: any) touching first..last with `code`, `left` more
    times (-1: until cleared)."""

    function: int | None
    first: int
    last: int
    code: int
    left: int = -1

    def applies(self, function: int, address: int, count: int) -> bool:
        touches = self.first <= address + count - 1 and address <= self.last
        return self.left != 0 and self.function in (None, function) and touches


def _evaluation_order(f: Field) -> int:
    """Measured walks first, then per-phase powers, total power, and energy last."""
    base, suffix = _base(f.quantity)
    if base.startswith("energy_"):
        return 3
    if base == "active_power" and not suffix:
        return 2
    if base in ("active_power", "apparent_power", "reactive_power"):
        return 1
    return 0


class EmulatedDevice:
    """A device on an emulated bus; give it to `ModbusTcpEmulator` or `ModbusRtuEmulator`."""

    def __init__(
        self,
        profile: str | Profile,
        unit_id: int | None = None,
        *,
        seed: int = 0,
        warmup_reads: int = 0,
    ) -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.unit_id = self.profile.unit_id if unit_id is None else unit_id
        # faults: plain attributes, read by the emulator thread on every request
        self.dead = False
        self.delay_s = 0.0
        self.word_order: str | None = None
        self.exceptions: list[ExceptionFault] = []
        self.not_a_number: set[str] = set()  # float32 quantities answered as NaN
        self.warmup_reads = warmup_reads
        # what happened, guarded by `lock`
        self.lock = threading.Lock()
        self.requests = 0
        self.writes: list[tuple[int, int]] = []
        self.served: list[dict[str, float]] = []
        self._rng = random.Random(seed)
        self._walks: dict[str, _Walk] = {}
        self._energy: dict[str, float] = {}
        self._values: dict[str, float] = {}
        self._late = 0  # answers being delayed now (on the emulator's loop)

    @property
    def busy(self) -> bool:
        """True while a late answer (`delay_s`) is still to be sent."""
        return self._late > 0

    # -- fault injection -------------------------------------------------------------

    def add_exception(
        self,
        code: int,
        function: int | None = None,
        first: int = 0,
        last: int = 0xFFFF,
        times: int = -1,
    ) -> None:
        """Answer reads (of `function`, or any) touching registers first..last with `code`,
        `times` times (-1: until cleared)."""
        self.exceptions.append(ExceptionFault(function, first, last, code, times))

    def clear_faults(self) -> None:
        self.dead = False
        self.delay_s = 0.0
        self.word_order = None
        self.exceptions = []
        self.not_a_number = set()

    # -- values --------------------------------------------------------------------------

    def _walk(self, quantity: str) -> float:
        base, _suffix = _base(quantity)
        walk = self._walks.get(quantity)
        if walk is None:
            start, sigma, low, high = _WALKS.get(base, _DEFAULT_WALK)
            walk = _Walk(start + self._rng.uniform(-sigma, sigma) * 5, sigma, low, high)
            self._walks[quantity] = walk
        return walk.step(self._rng)

    def _value(self, f: Field, fresh: dict[str, float]) -> float:
        """This read's value of `f`, derived from the walks read before it in `fresh`."""
        base, suffix = _base(f.quantity)
        if f.status_mask:
            return 0.0
        if base in ("active_power", "apparent_power", "reactive_power"):
            return self._power(base, suffix, fresh)
        if base.startswith("energy_"):
            power = abs(fresh.get("active_power", 0.0)) if base == "energy_import" else 20.0
            kwh = 1234.5 if base == "energy_import" else 12.5
            joules = self._energy.get(f.quantity, 3.6e6 * kwh)
            self._energy[f.quantity] = joules + power * _SECONDS_PER_READ
            return self._energy[f.quantity]
        return self._walk(f.quantity)

    def _power(self, base: str, suffix: str, fresh: dict[str, float]) -> float:
        if not suffix and "active_power_l1" in fresh and base == "active_power":
            return sum(fresh.get(f"active_power_l{i}", 0.0) for i in (1, 2, 3))
        volts = fresh.get(f"voltage{suffix}") or self._walk(f"voltage{suffix or '_l1'}")
        amps = fresh.get(f"current{suffix}") or self._walk(f"current{suffix or '_l1'}")
        pf = fresh.get("power_factor") or self._walk("power_factor")
        apparent = volts * amps
        if base == "apparent_power":
            return apparent
        if base == "active_power":
            return apparent * pf
        return apparent * math.sqrt(max(1.0 - pf * pf, 0.0))

    def _warming(self) -> bool:
        return self.requests <= self.warmup_reads

    def _encode(self, f: Field, value: float) -> list[int]:
        raw = (value - f.offset) / f.scale
        order = self.word_order or f.word_order
        if f.kind == "float32":
            bits = int.from_bytes(struct.pack(">f", raw), "big")
            return codec.split32(bits, order)
        size = codec.TYPE_REGISTERS[f.kind]
        signed = f.kind.startswith("int")
        span = 1 << (16 * size)
        low, high = (-(span >> 1), (span >> 1) - 1) if signed else (0, span - 1)
        number = min(max(round(raw), low), high) % span
        if size == 2:
            return codec.split32(number, order)
        if order in ("BADC", "DCBA"):
            number = ((number & 0xFF) << 8) | (number >> 8)
        return [number]

    def refresh(self, function: int, start: int, registers: list[int]) -> None:
        """Write fresh values of every field of `function` into a block starting at `start`."""
        fresh: dict[str, float] = {}
        warming = self._warming()
        for f in sorted(self.profile.fields, key=_evaluation_order):
            value = self._value(f, fresh)
            if warming:  # the S8 right after power-up: 0 ppm, "out of range"
                value = float(1 << 5 if f.status_mask else 0)
            fresh[f.quantity] = value
        read_back: dict[str, float] = {}
        for f in self.profile.fields:
            broken = f.quantity in self.not_a_number and f.kind == "float32"
            words = self._encode(f, math.nan if broken else fresh[f.quantity])
            if f.function == function:
                registers[f.address - start : f.address - start + len(words)] = words
            raw = codec.field_raw(words, 0, f.kind, self.word_order or f.word_order)
            if f.publish and codec.is_finite(raw):
                read_back[f.quantity] = raw * f.scale + f.offset
        self._values = read_back

    # -- pymodbus --------------------------------------------------------------------------

    def sim_device(self) -> SimDevice:
        """The pymodbus SimDevice serving this device's registers."""
        blocks = {function: self._blocks(function) for function in codec.READ_FUNCTIONS}
        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        simdata = (bits, list(bits), blocks[codec.READ_HOLDING], blocks[codec.READ_INPUT])
        return SimDevice(self.unit_id, simdata=simdata, action=self._action)

    def _blocks(self, function: int) -> list[SimData]:
        known = _DEVICE_MAPS.get(self.profile.name, {}).get(function)
        if known is None:
            known = self._extent(function)
        if not known:
            return [SimData(0, datatype=DataType.INVALID)]
        return [
            SimData(start, values=list(values), datatype=DataType.REGISTERS)
            for start, values in known
        ]

    def _extent(self, function: int) -> list[tuple[int, list[int]]]:
        """Every register from the first to the last field of `function`, minus the holes."""
        fields = [f for f in self.profile.fields if f.function == function]
        if not fields:
            return []
        first = min(f.address for f in fields)
        last = max(f.address + f.count - 1 for f in fields)
        holes = [(a, b) for fn, a, b in self.profile.holes if fn == function]
        blocks: list[tuple[int, list[int]]] = []
        run_start = None
        for address in range(first, last + 2):
            inside = address <= last and not any(a <= address <= b for a, b in holes)
            if inside and run_start is None:
                run_start = address
            elif not inside and run_start is not None:
                blocks.append((run_start, [0] * (address - run_start)))
                run_start = None
        return blocks

    async def _action(  # noqa: PLR0917  # the signature pymodbus's SimDevice calls
        self,
        function: int,
        block_start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if values is not None:
            with self.lock:
                self.writes.extend((address + i, int(v)) for i, v in enumerate(values))
            return None
        if function in (codec.WRITE_SINGLE, codec.WRITE_MULTIPLE):
            return None  # the read-back half of a write
        with self.lock:
            self.requests += 1
        if self.delay_s > 0:
            self._late += 1
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self._late -= 1
        for fault in self.exceptions:
            if fault.applies(function, address, count):
                if fault.left > 0:
                    fault.left -= 1
                return ExcCodes(fault.code)
        self.refresh(function, block_start, registers)
        with self.lock:
            self.served.append(dict(self._values))
        return None

    def served_values(self) -> list[dict[str, float]]:
        """The published fields' values as a reader decodes them, one dict per read served."""
        with self.lock:
            return list(self.served)
