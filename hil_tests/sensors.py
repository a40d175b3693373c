"""A rig's sensors brought up for a scenario, each behind one small fault interface.

`bind_sensors` starts the emulator of every emulated sensor of a rig (or
takes a real rig's ports and addresses as they are) and returns one
`BoundSensor` per sensor: the agent's `[sensors.<id>]` table and its
`SensorFaults`. Emulated serial sensors sit on pseudo-terminals behind a
symlink that follows them across unplug and replug; Modbus devices share one
emulated RTU line or one TCP server per `bus` (a TCP server behind a
`NetProxy`, so that it can be unplugged); BLE devices advertise on one mock
BlueZ, whose D-Bus address the agent gets through `environment`.

`SensorFaults` is the same interface for every transport; what a transport
cannot do raises `FaultUnsupported` (a scenario calls `Rig.require` first to
skip instead). A real sensor supports no fault at all: software cannot pull
its plug.

Trust: the emulators are trusted test equipment.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drivers.a02yyuw.emulator import A02yyuwEmulator
from drivers.ble.emulation import AdvertisingEmulator
from drivers.ble.mockbluez import MockBlueZ
from drivers.bthome.emulator import BTHomeEmulator
from drivers.maxbotix.emulator import MaxbotixEmulator
from drivers.modbus import EmulatedDevice, ModbusRtuEmulator, ModbusTcpEmulator
from drivers.pms5003.emulator import Pms5003Emulator
from drivers.ruuvi.emulator import RuuviEmulator
from drivers.sds011.emulator import Sds011Emulator
from drivers.sps30.emulator import Sps30Emulator
from drivers.uart.device import PtyDevice
from hil_tests.netproxy import NetProxy
from hil_tests.rigfile import SensorSpec, agent_table
from provisioning.demo_sensors import DEMO_BTHOME_KEY

#: every sensor fault a scenario can ask for (the rig-level name of them all is "sensors")
SENSOR_FAULTS = ("unplug", "noise", "bad_checksum", "silence", "modbus_exception", "slow")


class FaultUnsupported(Exception):
    """This sensor's transport (or real hardware) cannot inject the fault asked for."""


class SensorFaults:
    """Faults of one sensor. This base supports none: it stands for a real sensor."""

    kinds: frozenset[str] = frozenset()

    def __init__(
        self, sensor_id: str, why_not: str = "a real sensor has no fault injector"
    ) -> None:
        self.sensor_id = sensor_id
        self._why_not = why_not

    def supports(self, kind: str) -> bool:
        return kind in self.kinds

    def why_not(self, kind: str) -> str:
        """Why `kind` cannot be injected here (for a skip message)."""
        return f"sensor {self.sensor_id}: cannot inject {kind}: {self._why_not}"

    def _unsupported(self, kind: str) -> FaultUnsupported:
        return FaultUnsupported(self.why_not(kind))

    def unplug(self) -> None:
        """The device is gone: the port hangs up, the server stops answering, the tag vanishes."""
        raise self._unsupported("unplug")

    def replug(self) -> None:
        """The device is back (on a new pty behind the same path for serial devices)."""
        raise self._unsupported("unplug")

    def noise(self, n_bytes: int = 32) -> None:
        """Random bytes on the line, as a loose connector would send."""
        raise self._unsupported("noise")

    def bad_checksum(self) -> None:
        """One frame whose checksum is wrong."""
        raise self._unsupported("bad_checksum")

    def silence(self, silent: bool = True) -> None:
        """The device stays connected but sends (or answers) nothing while `silent`."""
        raise self._unsupported("silence")

    def modbus_exception(self, code: int = 4, *, times: int = -1) -> None:
        """Answer reads with Modbus exception `code` (4: device failure), `times` times or
        until `clear`."""
        raise self._unsupported("modbus_exception")

    def slow(self, delay_s: float) -> None:
        """Answer every request `delay_s` late."""
        raise self._unsupported("slow")

    def clear(self) -> None:
        """Undo silence, exceptions and slowness (not an unplug: `replug` does that)."""
        raise self._unsupported("clear")


class SerialFaults(SensorFaults):
    """A serial sensor's emulator on a pty."""

    kinds = frozenset({"unplug", "noise", "bad_checksum", "silence"})

    def __init__(self, sensor_id: str, device: PtyDevice) -> None:
        super().__init__(sensor_id, "a serial sensor has no Modbus exceptions or response delay")
        self.device = device

    def unplug(self) -> None:
        self.device.unplug()

    def replug(self) -> None:
        self.device.replug()

    def noise(self, n_bytes: int = 32) -> None:
        self.device.inject_noise(n_bytes)

    def bad_checksum(self) -> None:
        self.device.inject_bad_checksum()

    def silence(self, silent: bool = True) -> None:
        self.device.set_silent(silent)

    def clear(self) -> None:
        self.device.set_silent(False)


class ModbusFaults(SensorFaults):
    """A device on an emulated Modbus line or server. Unplugging takes the whole bus away
    (the USB-RS485 adapter, or the TCP link): every device on it goes with it."""

    kinds = frozenset({"unplug", "silence", "modbus_exception", "slow"})

    def __init__(
        self,
        sensor_id: str,
        device: EmulatedDevice,
        *,
        rtu: ModbusRtuEmulator | None = None,
        link: NetProxy | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(sensor_id, "a Modbus TCP link carries no raw noise or checksums")
        self.device = device
        self._rtu = rtu
        self._link = link
        self._rng = random.Random(seed)
        if rtu is not None:  # the RS-485 line: garbage and bad CRCs for everyone on it
            self.kinds = ModbusFaults.kinds | {"noise", "bad_checksum"}

    def noise(self, n_bytes: int = 32) -> None:
        if self._rtu is None:
            raise self._unsupported("noise")
        self._rtu.inject_noise(self._rng.randbytes(n_bytes))

    def bad_checksum(self) -> None:
        if self._rtu is None:
            raise self._unsupported("bad_checksum")
        self._rtu.inject_bad_checksum()

    def unplug(self) -> None:
        if self._rtu is not None:
            self._rtu.disconnect()
        elif self._link is not None:
            self._link.cut()

    def replug(self) -> None:
        if self._rtu is not None:
            self._rtu.replug()
        elif self._link is not None:
            self._link.restore()

    def silence(self, silent: bool = True) -> None:
        self.device.dead = silent

    def modbus_exception(self, code: int = 4, *, times: int = -1) -> None:
        self.device.add_exception(code, times=times)

    def slow(self, delay_s: float) -> None:
        self.device.delay_s = delay_s

    def clear(self) -> None:
        self.device.clear_faults()


class BleFaults(SensorFaults):
    """A BLE device advertising on the mock BlueZ."""

    kinds = frozenset({"unplug", "silence"})

    def __init__(self, sensor_id: str, device: AdvertisingEmulator) -> None:
        super().__init__(sensor_id, "a BLE advertisement has no wire to disturb")
        self.device = device

    def unplug(self) -> None:
        self.device.remove()

    def replug(self) -> None:
        self.device.restore()

    def silence(self, silent: bool = True) -> None:
        self.device.set_silent(silent)

    def clear(self) -> None:
        self.device.set_silent(False)


@dataclass
class BoundSensor:
    """One sensor of a running rig: what the agent's config says, and its faults.
    `emulator` is the emulator object (None on a real rig), for scenario-specific checks."""

    spec: SensorSpec
    table: dict[str, object]
    faults: SensorFaults
    emulator: object | None = None


@dataclass
class BoundSensors:
    sensors: dict[str, BoundSensor] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)  # for the agent (BLE bus)


def bind_sensors(
    stack: contextlib.ExitStack, specs: Sequence[SensorSpec], *, emulated: bool, devdir: Path
) -> BoundSensors:
    """Bring up every sensor of a rig; whatever is started is entered into `stack`."""
    if not emulated:
        for spec in specs:
            _check_present(spec)
        return BoundSensors(
            {s.sensor_id: BoundSensor(s, agent_table(s), SensorFaults(s.sensor_id)) for s in specs}
        )
    devdir.mkdir(parents=True, exist_ok=True)
    bound = BoundSensors()
    for spec in specs:
        if spec.transport == "serial":
            bound.sensors[spec.sensor_id] = _serial(stack, spec, devdir)
    _modbus_rtu(stack, [s for s in specs if s.transport == "modbus-rtu"], devdir, bound)
    _modbus_tcp(stack, [s for s in specs if s.transport == "modbus-tcp"], bound)
    ble = [s for s in specs if s.transport == "ble"]
    if ble:
        bluez = stack.enter_context(MockBlueZ(export_env=False))
        bound.environment.update(bluez.environ())
        for spec in ble:
            bound.sensors[spec.sensor_id] = _ble(stack, spec, bluez)
    # in the rig file's order, as the agent's config lists them
    bound.sensors = {s.sensor_id: bound.sensors[s.sensor_id] for s in specs}
    return bound


def _check_present(spec: SensorSpec) -> None:
    """A real rig's serial port must be there: say which adapter is missing, before the
    agent is started only to report it in its log."""
    port = spec.port
    if port is not None and not port.startswith("tcp://") and not Path(port).exists():
        raise FileNotFoundError(
            f"sensor {spec.sensor_id}: {port} does not exist: is its adapter plugged in? "
            "(ls -l /dev/serial/by-id/ lists the adapters that are)"
        )


def _serial(stack: contextlib.ExitStack, spec: SensorSpec, devdir: Path) -> BoundSensor:
    link = str(devdir / spec.sensor_id)
    options = spec.options
    device: PtyDevice
    match spec.family:
        case "pms5003":
            device = Pms5003Emulator(
                period_s=spec.period_s,
                seed=spec.seed,
                mode=str(options.get("mode", "active")),
                wait_for_host=True,
                link=link,
            )
        case "sds011":
            device = Sds011Emulator(
                period_s=spec.period_s, seed=spec.seed, wait_for_host=True, link=link
            )
        case "sps30":
            device = Sps30Emulator(sample_s=spec.period_s, seed=spec.seed, link=link)
        case "maxbotix":
            model = str(options.get("model", "hrxl"))
            device = MaxbotixEmulator(
                model=model, period_s=spec.period_s, seed=spec.seed, link=link
            )
        case "a02yyuw":
            device = A02yyuwEmulator(
                model=str(options.get("model", "a02yyuw")),
                mode=str(options.get("mode", "auto")),
                period_s=spec.period_s,
                seed=spec.seed,
                link=link,
            )
        case other:
            raise ValueError(f"no serial emulator for family {other!r}")
    stack.enter_context(device)
    return BoundSensor(
        spec, agent_table(spec, port=link), SerialFaults(spec.sensor_id, device), device
    )


def _by_bus(specs: Sequence[SensorSpec]) -> dict[str, list[SensorSpec]]:
    buses: dict[str, list[SensorSpec]] = {}
    for spec in specs:
        buses.setdefault(spec.bus, []).append(spec)
    return buses


def _device(spec: SensorSpec) -> EmulatedDevice:
    assert spec.profile is not None  # the rig file requires a profile for Modbus sensors
    return EmulatedDevice(spec.profile, spec.unit_id, seed=spec.seed)


def _modbus_rtu(
    stack: contextlib.ExitStack, specs: Sequence[SensorSpec], devdir: Path, bound: BoundSensors
) -> None:
    for bus, members in _by_bus(specs).items():
        devices = [_device(spec) for spec in members]
        baud = _baud(members[0].options, devices[0])
        link = str(devdir / f"modbus-{bus}")
        line = stack.enter_context(ModbusRtuEmulator(devices, baud=baud, link=link))
        for spec, device in zip(members, devices, strict=True):
            bound.sensors[spec.sensor_id] = BoundSensor(
                spec,
                agent_table(spec, port=link),
                ModbusFaults(spec.sensor_id, device, rtu=line, seed=spec.seed),
                line,
            )


def _baud(options: Mapping[str, object], device: EmulatedDevice) -> int:
    given = options.get("baud")
    return given if isinstance(given, int) else device.profile.baud


def _modbus_tcp(
    stack: contextlib.ExitStack, specs: Sequence[SensorSpec], bound: BoundSensors
) -> None:
    for bus, members in _by_bus(specs).items():
        devices = [_device(spec) for spec in members]
        server = stack.enter_context(ModbusTcpEmulator(devices))
        link = stack.enter_context(
            NetProxy(server.host, server.tcp_port, name=f"modbus-tcp-{bus}-link")
        )
        port = f"tcp://{link.host}:{link.port}"
        for spec, device in zip(members, devices, strict=True):
            bound.sensors[spec.sensor_id] = BoundSensor(
                spec,
                agent_table(spec, port=port),
                ModbusFaults(spec.sensor_id, device, link=link),
                server,
            )


def _ble(stack: contextlib.ExitStack, spec: SensorSpec, bluez: MockBlueZ) -> BoundSensor:
    assert spec.address is not None  # the rig file gives every emulated BLE sensor one
    device: AdvertisingEmulator
    table = agent_table(spec)
    match spec.family:
        case "ruuvi":
            device = RuuviEmulator(bluez, spec.address, interval_s=spec.period_s, seed=spec.seed)
        case "bthome":
            key = spec.options.get("key")
            if not isinstance(key, str):
                key = DEMO_BTHOME_KEY.hex()
                table["key"] = key
            device = BTHomeEmulator(
                bluez,
                spec.address,
                key=bytes.fromhex(key),
                interval_s=spec.period_s,
                seed=spec.seed,
            )
        case other:
            raise ValueError(f"no BLE emulator for family {other!r}")
    stack.enter_context(device)
    return BoundSensor(spec, table, BleFaults(spec.sensor_id, device), device)
