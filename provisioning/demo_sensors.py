"""The demo's emulated sensors: one or more of every family, on their real transports.

Each entry starts an emulator (entered into the caller's ExitStack, so it is
stopped whatever happens) and returns the `[sensors.<id>]` table the agent
needs to read it. Serial devices sit on pseudo-terminals paced at their baud
rate; Modbus devices on pymodbus servers (RTU over a pty, and TCP); BLE
devices on a mock BlueZ on a private D-Bus, whose address the agent gets
through the environment returned here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from drivers.a02yyuw.emulator import A02yyuwEmulator
from drivers.ble.mockbluez import MockBlueZ
from drivers.bthome.emulator import BTHomeEmulator
from drivers.maxbotix.emulator import MaxbotixEmulator
from drivers.modbus import EmulatedDevice, ModbusRtuEmulator, ModbusTcpEmulator
from drivers.pms5003.emulator import Pms5003Emulator
from drivers.ruuvi.emulator import RuuviEmulator
from drivers.sds011.emulator import Sds011Emulator
from drivers.sps30.emulator import Sps30Emulator

#: a demo-only BTHome bind key (a real one is per device, from its maker or its firmware)
DEMO_BTHOME_KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")

#: a street bin: the sensor under the lid sees the bottom at 1.2 m and the fill line at 0.2 m
BIN = {"empty_distance_m": 1.2, "full_distance_m": 0.2}
#: an underground container: bottom at 2.5 m, fill line at 0.5 m
DEEP_BIN = {"empty_distance_m": 2.5, "full_distance_m": 0.5}


@dataclass(frozen=True)
class DemoSensor:
    sensor_id: str
    family: str
    description: str
    table: dict[str, object]


def start_sensors(
    stack: contextlib.ExitStack, workdir: Path
) -> tuple[list[DemoSensor], dict[str, str]]:
    """Start every emulator; return the sensors and the environment the agent needs."""
    bluez = stack.enter_context(MockBlueZ(export_env=False))
    sensors = _serial(stack) + _modbus(stack) + _ble(stack, bluez)
    return sensors, bluez.environ()


def _serial(stack: contextlib.ExitStack) -> list[DemoSensor]:
    air_1 = stack.enter_context(Pms5003Emulator(period_s=1.0, seed=1, wait_for_host=True))
    air_2 = stack.enter_context(Pms5003Emulator(period_s=1.0, seed=2, wait_for_host=True))
    air_3 = stack.enter_context(Sds011Emulator(period_s=1.0, seed=3, wait_for_host=True))
    air_4 = stack.enter_context(Sps30Emulator(sample_s=1.0, seed=4))
    bin_1 = stack.enter_context(MaxbotixEmulator(model="hrxl", period_s=1.0, seed=5, start_m=0.9))
    bin_2 = stack.enter_context(A02yyuwEmulator(period_s=1.0, seed=6, start_m=0.6))
    return [
        DemoSensor(
            "air_1",
            "pms5003",
            f"PMS5003 particulate sensor, active mode, on {air_1.port}",
            {"driver": "pms5003", "port": air_1.port, "mode": "active"},
        ),
        DemoSensor(
            "air_2",
            "pms5003",
            f"PMS5003 particulate sensor, passive mode (polled), on {air_2.port}",
            {"driver": "pms5003", "port": air_2.port, "mode": "passive", "poll_interval_s": 1.0},
        ),
        DemoSensor(
            "air_3",
            "sds011",
            f"SDS011 particulate sensor, active mode, on {air_3.port}",
            {"driver": "sds011", "port": air_3.port, "mode": "active"},
        ),
        DemoSensor(
            "air_4",
            "sps30",
            f"SPS30 particulate sensor over SHDLC at 115200 baud, on {air_4.port}",
            {"driver": "sps30", "port": air_4.port, "poll_interval_s": 1.0},
        ),
        DemoSensor(
            "bin_1",
            "maxbotix",
            f"MaxBotix HRXL ultrasonic under a bin lid (fill level), on {bin_1.port}",
            {"driver": "maxbotix", "port": bin_1.port, "model": "hrxl", "bin": BIN},
        ),
        DemoSensor(
            "bin_2",
            "a02yyuw",
            f"DFRobot A02YYUW ultrasonic under a bin lid (fill level), on {bin_2.port}",
            {"driver": "a02yyuw", "port": bin_2.port, "bin": BIN},
        ),
    ]


def _modbus(stack: contextlib.ExitStack) -> list[DemoSensor]:
    """An RS-485 bus with an energy meter and a CO2 sensor (RTU), and a TCP distance sensor."""
    rtu = stack.enter_context(
        ModbusRtuEmulator(
            [EmulatedDevice("sdm120", 1, seed=9), EmulatedDevice("senseair_s8", 2, seed=10)],
            baud=9600,
        )
    )
    tcp = stack.enter_context(ModbusTcpEmulator([EmulatedDevice("urm13", 13, seed=11)]))
    return [
        DemoSensor(
            "meter_1",
            "modbus",
            f"Eastron SDM120 energy meter, Modbus RTU unit 1 at 9600 baud, on {rtu.port}",
            {
                "driver": "modbus",
                "port": rtu.port,
                "profile": "sdm120",
                "baud": 9600,
                "period_s": 2.0,
            },
        ),
        DemoSensor(
            "co2_1",
            "modbus",
            f"Senseair S8 CO2 sensor, unit 2 on the same RS-485 bus ({rtu.port})",
            {
                "driver": "modbus",
                "port": rtu.port,
                "profile": "senseair_s8",
                "baud": 9600,
                "unit_id": 2,
                "period_s": 2.0,
            },
        ),
        DemoSensor(
            "bin_3",
            "modbus",
            f"DFRobot URM13 ultrasonic over Modbus TCP (fill level), at {tcp.port}",
            {
                "driver": "modbus",
                "port": tcp.port,
                "profile": "urm13",
                "period_s": 1.0,
                "bin": DEEP_BIN,
            },
        ),
    ]


def _ble(stack: contextlib.ExitStack, bluez: MockBlueZ) -> list[DemoSensor]:
    ruuvi = stack.enter_context(RuuviEmulator(bluez, "C4:7C:8D:6A:11:01", seed=7))
    thermo = stack.enter_context(
        BTHomeEmulator(bluez, "A4:C1:38:8D:18:B2", key=DEMO_BTHOME_KEY, seed=8)
    )
    return [
        DemoSensor(
            "tag_1",
            "ruuvi",
            f"RuuviTag (data format 5) advertising as {ruuvi.address} on a mock BlueZ",
            {"driver": "ruuvi", "address": ruuvi.address},
        ),
        DemoSensor(
            "tag_2",
            "bthome",
            f"BTHome v2 sensor, encrypted (AES-CCM), as {thermo.address} on a mock BlueZ",
            {"driver": "bthome", "address": thermo.address, "key": DEMO_BTHOME_KEY.hex()},
        ),
    ]
