"""Modbus poll benchmark: requests, wire bytes and cycle time of one bus of the shipped profiles.

It puts the four shipped profiles on one emulated RTU bus (`ModbusRtuEmulator`:
pymodbus RTU server behind a relay that paces every byte at the baud rate,
10 bits a byte) and polls them with the real driver and bus scheduler, all on
one period so that each period is one poll cycle of the whole bus. From the
bus's transaction trace it reports, per cycle:

- transactions, against the minimum for the configured registers (fewest reads
  under each profile's limits, found by a dynamic programme independent of the
  driver's planner, plus the URM13's trigger write) and against one request per
  field;
- wire bytes (cross-checked with the relay's byte counters), against a lower
  bound: the minimum transactions with no gap registers at all;
- the cycle time, from the first request to the last reply, against the
  wire-time bound of the same transactions in the same order: bytes at 10 bits
  each, t3.5 between frames, and each device's idle time (Eastron 60 ms) and
  trigger wait (URM13 100 ms) before its next request, with zero device
  response time.

Targets (printed, never asserted): transactions at the minimum; cycle time
within 15 % of the bound. Run: `.venv/bin/python bench/modbus_poll.py [--json]
[--baud 9600] [--cycles 5]`.

Trusts: nothing from outside; the devices are emulated in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from drivers.base import Reading
from drivers.modbus import EmulatedDevice, ModbusRtuEmulator, codec, load_profile
from drivers.modbus.bus import Transaction
from drivers.modbus.driver import ModbusFamily
from drivers.modbus.options import BusSettings
from drivers.modbus.profile import Profile

#: (sensor, profile, unit id) on the bus
DEVICES = (("meter_1", "sdm120", 1), ("meter_3", "sdm630", 2), ("co2_1", "senseair_s8", 3),
           ("bin_1", "urm13", 13))  # fmt: skip
RTU_REQUEST = 8
RTU_REPLY_OVERHEAD = 5
BITS_PER_BYTE = 10
TARGET_CYCLE_RATIO = 1.15


@dataclass(frozen=True)
class Plan:
    """What one device's poll needs, by the profile, and the least it could need."""

    sensor: str
    profile: Profile
    unit: int

    @property
    def transactions(self) -> int:
        return len(self.profile.reads) + (self.profile.trigger is not None)

    @property
    def minimum(self) -> int:
        return min_reads(self.profile) + (self.profile.trigger is not None)

    @property
    def one_per_field(self) -> int:
        return len(self.profile.fields) + (self.profile.trigger is not None)

    @property
    def bytes_lower_bound(self) -> int:
        registers = sum(f.count for f in self.profile.fields)
        trigger = 2 * RTU_REQUEST if self.profile.trigger is not None else 0
        return (
            min_reads(self.profile) * (RTU_REQUEST + RTU_REPLY_OVERHEAD) + 2 * registers + trigger
        )


def min_reads(profile: Profile) -> int:
    """Fewest reads covering every field under the profile's limits (dynamic programme)."""
    total = 0
    for function in sorted({f.function for f in profile.fields}):
        fields = sorted((f.address, f.count) for f in profile.fields if f.function == function)
        gap = profile.max_gaps.get(function, 0)
        holes = [(a, b) for fn, a, b in profile.holes if fn == function]
        best = [0] + [len(fields) + 1] * len(fields)
        for end in range(1, len(fields) + 1):
            for begin in range(end):
                if _feasible(fields[begin:end], profile.max_registers, gap, holes):
                    best[end] = min(best[end], best[begin] + 1)
        total += best[-1]
    return total


def _feasible(
    group: Sequence[tuple[int, int]], max_registers: int, gap: int, holes: list[tuple[int, int]]
) -> bool:
    start = group[0][0]
    reach = start
    for address, count in group:
        if address - reach > gap:
            return False
        reach = max(reach, address + count)
    if reach - start > max_registers:
        return False
    return not any(a <= reach - 1 and start <= b for a, b in holes)


def wire_bound(cycle: list[Transaction], plans: dict[int, Plan], baud: int, t35: float) -> float:
    """Shortest time for the same transactions in the same order: wire time, gaps, idle times."""
    byte_s = BITS_PER_BYTE / baud
    clock = 0.0
    ready: dict[int, float] = {}
    seen: dict[int, int] = {}
    for index, t in enumerate(cycle):
        start = max(clock + (t35 if index else 0.0), ready.get(t.unit, 0.0))
        end = start + (t.bytes_out + t.bytes_in) * byte_s
        profile = plans[t.unit].profile
        wait = max(profile.min_idle_s, t35)
        if profile.trigger is not None and seen.get(t.unit, 0) == 0:
            wait = max(wait, profile.trigger.wait_s)  # the first transaction is the trigger
        seen[t.unit] = seen.get(t.unit, 0) + 1
        ready[t.unit] = end + wait
        clock = end
    return clock


def split_cycles(trace: list[Transaction], period: float) -> list[list[Transaction]]:
    cycles: list[list[Transaction]] = []
    for t in sorted(trace, key=lambda t: t.started):
        if not cycles or t.started - cycles[-1][0].started > period / 2:
            cycles.append([])
        cycles[-1].append(t)
    return cycles


async def _poll(emu: ModbusRtuEmulator, baud: int, cycles: int, period: float) -> list[Transaction]:
    family = ModbusFamily()
    bus = family.buses.acquire(BusSettings(emu.port, baud, "N", 1))
    trace: list[Transaction] = []
    bus.trace = trace
    drivers = []
    for sensor, name, unit in DEVICES:
        table = {"port": emu.port, "profile": name, "unit_id": unit, "baud": baud}
        options = family.parse_options(sensor, {**table, "period_s": period})
        drivers.append(family.create(sensor, options))
    polls: dict[str, int] = {}
    done = asyncio.Event()

    def emit(batch: Sequence[Reading]) -> None:
        polls[batch[0].sensor] = polls.get(batch[0].sensor, 0) + 1
        if len(polls) == len(drivers) and min(polls.values()) >= cycles:
            done.set()

    tasks = [asyncio.create_task(d.run(emit), name=f"bench-{d.sensor_id}") for d in drivers]
    try:
        await done.wait()
        async with bus.held():  # stop between transactions, so that no count is cut short
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        family.buses.release(bus)
    return [t for t in trace if t.answered]


def run(baud: int, cycles: int, period: float) -> dict[str, Any]:
    plans = {unit: Plan(sensor, load_profile(name), unit) for sensor, name, unit in DEVICES}
    devices = [EmulatedDevice(name, unit, seed=unit) for _sensor, name, unit in DEVICES]
    with ModbusRtuEmulator(devices, baud=baud) as emu:
        trace = asyncio.run(_poll(emu, baud, cycles, period))
        relay_bytes = emu.bytes_to_devices + emu.bytes_to_host
    t35 = codec.silent_interval_s(baud, BITS_PER_BYTE)
    whole = [
        c
        for c in split_cycles(trace, period)
        if len(c) == sum(p.transactions for p in plans.values())
    ]
    measured = [c[-1].ended - c[0].started for c in whole]
    bounds = [wire_bound(c, plans, baud, t35) for c in whole]
    per_cycle_bytes = [sum(t.bytes_out + t.bytes_in for t in c) for c in whole]
    traced_bytes = sum(t.bytes_out + t.bytes_in for t in trace)
    ratio = statistics.mean(m / b for m, b in zip(measured, bounds, strict=True)) if whole else 0.0
    return {
        "baud": baud,
        "silent_interval_ms": round(t35 * 1000, 3),
        "cycles": len(whole),
        "devices": [
            {
                "sensor": p.sensor,
                "profile": p.profile.name,
                "unit": unit,
                "transactions": p.transactions,
                "minimum": p.minimum,
                "one_per_field": p.one_per_field,
                "reads": [[r.function, r.start, r.count] for r in p.profile.reads],
            }
            for unit, p in plans.items()
        ],
        "transactions_per_cycle": statistics.mean(len(c) for c in whole) if whole else 0,
        "minimum_transactions": sum(p.minimum for p in plans.values()),
        "one_per_field_transactions": sum(p.one_per_field for p in plans.values()),
        "wire_bytes_per_cycle": statistics.mean(per_cycle_bytes) if whole else 0,
        "wire_bytes_lower_bound": sum(p.bytes_lower_bound for p in plans.values()),
        "relay_bytes_equal_traced": relay_bytes == traced_bytes,
        "cycle_ms_mean": round(statistics.mean(measured) * 1000, 1) if whole else None,
        "cycle_ms_min": round(min(measured) * 1000, 1) if whole else None,
        "cycle_ms_max": round(max(measured) * 1000, 1) if whole else None,
        "wire_bound_ms": round(statistics.mean(bounds) * 1000, 1) if whole else None,
        "cycle_to_bound_ratio": round(ratio, 3),
        "targets": {
            "transactions_at_minimum": True,
            "cycle_to_bound_ratio_max": TARGET_CYCLE_RATIO,
        },
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Modbus poll: {len(result['devices'])} devices on one emulated RTU bus at "
        f"{result['baud']} baud, 8N1 (t3.5 = {result['silent_interval_ms']} ms), "
        f"{result['cycles']} cycles",
        f"{'sensor':<9} {'profile':<12} {'unit':>4} {'requests':>8} {'minimum':>7} {'1/field':>7}",
    ]
    lines.extend(
        f"{d['sensor']:<9} {d['profile']:<12} {d['unit']:>4} {d['transactions']:>8} "
        f"{d['minimum']:>7} {d['one_per_field']:>7}"
        for d in result["devices"]
    )
    at_min = result["transactions_per_cycle"] == result["minimum_transactions"]
    ratio = result["cycle_to_bound_ratio"]
    lines += [
        f"transactions per cycle: {result['transactions_per_cycle']:g} (minimum "
        f"{result['minimum_transactions']}, one per field {result['one_per_field_transactions']})"
        f" -> target {'met' if at_min else 'MISSED'}",
        f"wire bytes per cycle: {result['wire_bytes_per_cycle']:g} (lower bound without gap "
        f"registers {result['wire_bytes_lower_bound']}; relay count agrees: "
        f"{result['relay_bytes_equal_traced']})",
        f"cycle time: {result['cycle_ms_mean']} ms mean ({result['cycle_ms_min']}-"
        f"{result['cycle_ms_max']}), wire-time bound {result['wire_bound_ms']} ms -> "
        f"{ratio:.3f}x (target <= {TARGET_CYCLE_RATIO}x: "
        f"{'met' if 0 < ratio <= TARGET_CYCLE_RATIO else 'MISSED'})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--baud", type=int, default=9600, help="bus speed (default 9600)")
    parser.add_argument("--cycles", type=int, default=5, help="poll cycles to measure")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between cycles")
    args = parser.parse_args(argv)
    result = run(args.baud, args.cycles, args.period)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
