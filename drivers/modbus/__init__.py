"""Modbus RTU and TCP devices read through register maps declared as data: public names."""

from __future__ import annotations

from drivers.base import DriverFamily
from drivers.modbus.bus import Bus, BusConflict, BusRegistry
from drivers.modbus.driver import ModbusDriver, ModbusFamily
from drivers.modbus.emulator import ModbusRtuEmulator, ModbusTcpEmulator
from drivers.modbus.options import BusSettings, ModbusOptions, parse_options
from drivers.modbus.profile import Profile, ProfileError, load_profile, shipped_profiles
from drivers.modbus.simdevice import EmulatedDevice

FAMILY: DriverFamily = ModbusFamily()

__all__ = [
    "FAMILY",
    "Bus",
    "BusConflict",
    "BusRegistry",
    "BusSettings",
    "EmulatedDevice",
    "ModbusDriver",
    "ModbusFamily",
    "ModbusOptions",
    "ModbusRtuEmulator",
    "ModbusTcpEmulator",
    "Profile",
    "ProfileError",
    "load_profile",
    "parse_options",
    "shipped_profiles",
]
