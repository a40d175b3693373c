"""The doctor's checks of the gateway's devices: sensor serial ports, free disk, the spool.

A serial port must exist, be a character device, and be free or held by the
running agent; it is opened exclusively (pyserial's flock, the same lock the
agent takes), so the doctor never opens a port the agent holds, and closed at
once. A port held by another program (a stray terminal program, a login
console on the UART) is a fault: the sensor's bytes would be split between
two readers. When the agent is not running, each sensor is then read for real:
its driver runs (all sensors at once) until its first reading or a timeout,
and is always cancelled; a sensor without a local port (BLE, Modbus TCP) is
read the same way, or skipped while the agent runs (the agent reads it). The
spool is opened read-only, so this is safe while the agent runs. The
judgements are pure functions of values (`judge_*`).

Trust: the config as `agent.config` checked it; /proc as the kernel reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import stat
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import serial

from agent.config import Config, SensorConfig
from drivers import Reading, family
from provisioning.doctor_checks import Check, Status
from provisioning.identity_tools import SERVICE_USER
from provisioning.procscan import Process, holders

MIN_FREE_BYTES = 16 << 20
#: outbox messages older than this mean the broker has not acknowledged for a while
BACKLOG_WARNING_S = 3600.0
_MIB = 1 << 20


# -- sensor ports -----------------------------------------------------------------------


def _sensor_ports(config: Config) -> dict[str, str]:
    """The `port` of every sensor table that has one (what `config check` looks at)."""
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
        data = tomllib.loads(config.source.read_text(encoding="utf-8"))
        sensors = data.get("sensors", {})
        return {
            sid: table["port"]
            for sid, table in sensors.items()
            if isinstance(table, dict) and isinstance(table.get("port"), str)
        }
    return {}


def _held_by(port: str, name: str, owners: list[Process] | None, agents: list[Process]) -> Check:
    agent_pids = {a.pid for a in agents}
    mine = [p for p in owners or [] if p.pid in agent_pids]
    if mine:
        return Check(name, Status.OK, f"{port} is in use by the running agent (pid {mine[0].pid})")
    if owners:
        listed = ", ".join(str(p) for p in owners)
        console = any("getty" in p.command for p in owners)
        return Check(
            name,
            Status.FAIL,
            f"{port} is held by another program: process {listed}",
            "a login console runs on this port: disable the serial console "
            "(sudo raspi-config: Interface Options, Serial Port)"
            if console
            else f"stop it (kill {owners[0].pid}): only one program may use a sensor port",
        )
    return Check(
        name,
        Status.FAIL,
        f"{port} is held by another program",
        f"find it with `sudo fuser -v {port}` and stop it; run the doctor as root to see it",
    )


def _device_problem(name: str, driver: str, port: str, fix_path: str) -> Check | None:
    """A failure when `port` is missing or not a character device."""
    try:
        info = os.stat(port)
    except FileNotFoundError:
        return Check(
            name,
            Status.FAIL,
            f"{driver} port {port} does not exist",
            f"check the sensor's cable and USB adapter (ls -l /dev/serial/by-id/), {fix_path}",
        )
    except OSError as exc:
        return Check(name, Status.FAIL, f"cannot look at {port}: {exc.strerror}", fix_path)
    if not stat.S_ISCHR(info.st_mode):
        return Check(name, Status.FAIL, f"{port} is not a serial device", fix_path)
    return None


def _open_problem(name: str, port: str, fix_path: str, agents: list[Process]) -> Check | None:
    """Open and close the port exclusively (the agent's own lock); a Check if that fails."""
    try:
        serial.Serial(port, exclusive=True, timeout=0).close()
    except serial.SerialException as exc:
        if "exclusively lock" in str(exc):
            return _held_by(port, name, holders(Path(port)), agents)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Check(
                name,
                Status.FAIL,
                f"no permission to open {port}",
                f"run the doctor as root; the service user needs the dialout group "
                f"(sudo usermod -aG dialout {SERVICE_USER})",
            )
        return Check(name, Status.FAIL, f"cannot open {port}: {exc}", fix_path)
    return None


def check_port(sensor_id: str, driver: str, port: str, agents: list[Process]) -> Check:
    """A serial port: present, a character device, and free (or held by the agent)."""
    name = f"sensor {sensor_id}"
    fix_path = f"or fix sensors.{sensor_id}.port in the config"
    problem = _device_problem(name, driver, port, fix_path) or _open_problem(
        name, port, fix_path, agents
    )
    if problem is not None:
        return problem
    others = holders(Path(port)) or []
    if others:  # open without the lock (a terminal program, a login console)
        return _held_by(port, name, others, agents)
    if agents:
        return Check(
            name,
            Status.WARN,
            f"{port} is free although the agent runs (pid {agents[0].pid}): "
            "the agent cannot use it",
            "look at the agent's log (journalctl -u citygate) for this sensor",
        )
    return Check(name, Status.OK, f"{driver} port {port} is present and free")


def read_limit(sensor: SensorConfig, timeout: float) -> float:
    """`timeout`, or longer for a sensor that is polled slowly (or warms up before a read)."""
    opts = sensor.options
    period = getattr(opts, "poll_interval_s", None)
    if not isinstance(period, int | float):
        return timeout
    warmup = getattr(opts, "warmup_s", 0.0) if getattr(opts, "sleep_between_reads", False) else 0.0
    return max(timeout, float(period) + float(warmup) + 1.0)


def _read_hint(port: str | None) -> str:
    if port is None:
        return (
            "check that the sensor is powered and in range, and that bluetooth runs "
            "(systemctl status bluetooth)"
        )
    if port.startswith("tcp://"):
        return f"check that the device answers at {port} (network, power, unit address)"
    return "check the sensor's wiring and power, and its baud rate in the config"


async def read_once(sensor: SensorConfig, port: str | None, wait_s: float) -> Check:
    """Run the sensor's real driver until its first reading (ok) or `wait_s` (FAIL)."""
    name = f"sensor {sensor.sensor_id}"
    where = f"{sensor.driver} on {port}" if port else sensor.driver
    try:
        driver = family(sensor.driver).create(sensor.sensor_id, sensor.options)
    except Exception as exc:  # a driver that cannot even start is that sensor's failure
        return Check(name, Status.FAIL, f"{where}: the driver did not start ({exc})")
    first: asyncio.Future[Reading] = asyncio.get_running_loop().create_future()

    def emit(readings: Sequence[Reading]) -> None:
        if readings and not first.done():
            first.set_result(readings[0])

    task = asyncio.create_task(driver.run(emit))
    limit = read_limit(sensor, wait_s)
    try:
        waiting: set[asyncio.Future[Any]] = {first, task}
        await asyncio.wait(waiting, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        state = driver.state()  # before the cancel, which makes every driver say "stopped"
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)
    if first.done():
        r = first.result()
        return Check(name, Status.OK, f"{where} answered: {r.quantity} {r.value:g} {r.unit}")
    failure = task.exception() if task.done() and not task.cancelled() else None
    reason = str(failure) if failure is not None else state.reason
    if reason == "not started":  # the driver never heard from the device
        reason = "nothing received from the sensor"
    return Check(
        name,
        Status.FAIL,
        f"{where}: no reading within {limit:g} s ({reason})",
        _read_hint(port),
    )


async def _read_all(
    reads: dict[int, tuple[SensorConfig, str | None]], wait_s: float
) -> list[Check]:
    return list(await asyncio.gather(*(read_once(s, p, wait_s) for s, p in reads.values())))


def check_sensors(config: Config, agents: list[Process], read_timeout: float) -> list[Check]:
    """Each sensor's port (see check_port), then, with the agent stopped, a real test read."""
    ports = _sensor_ports(config)
    checks: list[Check] = []
    reads: dict[int, tuple[SensorConfig, str | None]] = {}
    for sensor in config.sensors:
        port = ports.get(sensor.sensor_id)
        if port is not None and port.startswith("/"):
            check = check_port(sensor.sensor_id, sensor.driver, port, agents)
            if check.status is Status.OK and not agents:
                reads[len(checks)] = (sensor, port)
        elif agents:
            check = Check(
                f"sensor {sensor.sensor_id}",
                Status.SKIP,
                f"{sensor.driver}: not read, the running agent (pid {agents[0].pid}) reads it",
            )
        else:
            reads[len(checks)] = (sensor, port)
            check = Check(f"sensor {sensor.sensor_id}", Status.SKIP, "not read")
        checks.append(check)
    if reads:
        quiet = logging.getLogger("drivers")  # the result is the check's line, not driver logs
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            results = asyncio.run(_read_all(reads, read_timeout))
        finally:
            quiet.setLevel(level)
        for index, result in zip(reads, results, strict=True):
            checks[index] = result
    return checks


# -- disk and spool ---------------------------------------------------------------------


def judge_disk(where: Path, free: int, budget: int, spool_bytes: int) -> Check:
    if free < MIN_FREE_BYTES:
        return Check(
            "disk",
            Status.FAIL,
            f"only {free / _MIB:.1f} MiB free on {where}: the spool cannot keep readings",
            "free space (e.g. sudo journalctl --vacuum-size=50M, remove old files), "
            "or lower spool.budget_bytes",
        )
    room = max(0, budget - spool_bytes)
    if free < room:
        return Check(
            "disk",
            Status.WARN,
            f"{free / _MIB:.0f} MiB free on {where}, but the spool may grow by "
            f"{room / _MIB:.0f} MiB more (spool.budget_bytes)",
            "free space, or lower spool.budget_bytes to what the disk holds",
        )
    return Check(
        "disk",
        Status.OK,
        f"{free / _MIB:.0f} MiB free on {where} (spool budget {budget / _MIB:.0f} MiB)",
    )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(config: Config) -> Check:
    where = _existing(config.gateway.state_dir)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Check("disk", Status.FAIL, f"cannot look at {where}: {exc.strerror}")
    spool = config.spool.path
    used = sum(
        p.stat().st_size for p in (spool, spool.with_name(spool.name + "-wal")) if p.exists()
    )
    return judge_disk(where, free, config.spool.budget_bytes, used)


@dataclass(frozen=True)
class SpoolDepth:
    readings: int
    messages: int
    oldest_message_age_s: float | None
    dropped: int


def judge_spool(path: Path, depth: SpoolDepth) -> Check:
    summary = (
        f"{depth.readings} reading(s) and {depth.messages} message(s) waiting, "
        f"{depth.dropped} reading(s) dropped"
    )
    if depth.dropped:
        return Check(
            "spool",
            Status.WARN,
            f"{path}: {summary} because the spool was full",
            "the broker was out of reach longer than the spool budget holds: "
            "see the broker lines; tell operations",
        )
    age = depth.oldest_message_age_s
    if age is not None and age > BACKLOG_WARNING_S:
        return Check(
            "spool",
            Status.WARN,
            f"{path}: {summary}; the oldest message is {age / 3600:.1f} h old",
            "the broker has not acknowledged for a while: see the broker lines",
        )
    return Check("spool", Status.OK, f"{path}: {summary}")


def read_spool_depth(path: Path) -> SpoolDepth:
    """Counts from the spool file, opened read-only (the agent may be writing it)."""
    db = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=2.0)
    try:
        (readings,) = db.execute("SELECT count(*) FROM readings").fetchone()
        (messages, oldest) = db.execute("SELECT count(*), min(created) FROM outbox").fetchone()
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped_readings'").fetchone()
    finally:
        db.close()
    age = None if oldest is None else max(0.0, time.time() - float(oldest))
    return SpoolDepth(int(readings), int(messages), age, int(row[0]) if row else 0)


def check_spool(config: Config) -> Check:
    path = config.spool.path
    if not path.exists():
        return Check(
            "spool", Status.OK, f"no spool yet at {path} (the agent makes it when it first runs)"
        )
    try:
        depth = read_spool_depth(path)
    except sqlite3.Error as exc:
        return Check(
            "spool",
            Status.FAIL,
            f"{path} cannot be read as a spool ({exc})",
            "keep a copy for operations (readings not yet sent are in it); with the agent "
            f"stopped, move it aside (mv {path} {path}.bad) so the agent starts a new one",
        )
    return judge_spool(path, depth)
