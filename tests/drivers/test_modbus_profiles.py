"""Modbus register maps as data: shipped profiles, user maps, sensor options and their errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from drivers import OptionError, family
from drivers.modbus import FAMILY, ModbusOptions, ProfileError, load_profile, shipped_profiles
from drivers.modbus.options import BusSettings
from drivers.modbus.profile import Field, profile_from_table

PACKAGE = Path(__file__).parent.parent.parent / "drivers" / "modbus"


def _sample() -> dict[str, dict[str, Any]]:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        sensors: dict[str, dict[str, Any]] = tomllib.load(fh)["sensors"]
    return sensors


def test_the_four_profiles_are_shipped() -> None:
    assert shipped_profiles() == ["sdm120", "sdm630", "senseair_s8", "urm13"]


@pytest.mark.parametrize(
    ("name", "reads"),
    [
        ("sdm120", [(4, 0x00, 32), (4, 0x46, 6)]),
        ("sdm630", [(4, 0x00, 18), (4, 0x34, 24)]),
        ("senseair_s8", [(4, 0, 4)]),
        ("urm13", [(3, 5, 2)]),
    ],
)
def test_each_profile_loads_and_plans_its_reads(
    name: str, reads: list[tuple[int, int, int]]
) -> None:
    profile = load_profile(name)
    assert [(r.function, r.start, r.count) for r in profile.reads] == reads
    planned = sorted((f for r in profile.reads for f in r.fields), key=_key)
    assert planned == sorted(profile.fields, key=_key)
    assert all(r.count <= profile.max_registers for r in profile.reads)


def _key(f: Field) -> tuple[int, int, str]:
    return (f.function, f.address, f.quantity)


@pytest.mark.parametrize("name", ["sdm120", "sdm630"])
def test_eastron_meters_are_float32_abcd_input_registers_with_60_ms_idle(name: str) -> None:
    profile = load_profile(name)
    assert profile.min_idle_s >= 0.060
    assert profile.max_registers == 80
    assert {(f.function, f.kind, f.word_order) for f in profile.fields} == {(4, "float32", "ABCD")}
    energy = {f.quantity: (f.unit, f.scale) for f in profile.fields if "energy" in f.quantity}
    assert energy == {"energy_import": ("J", 3.6e6), "energy_export": ("J", 3.6e6)}
    assert all(f.address % 2 == 0 for f in profile.fields)  # never half a float


def test_senseair_status_word_is_read_with_co2_and_not_published() -> None:
    profile = load_profile("senseair_s8")
    (status,) = [f for f in profile.fields if f.status_mask]
    assert (status.address, status.status_mask, status.publish) == (0, 0x7F, False)
    assert status.status_bits[5] == "out of range"
    assert profile.unit_id == 254
    assert profile.baud == 9600


def test_urm13_triggers_a_measurement_before_each_read() -> None:
    profile = load_profile("urm13")
    assert profile.trigger is not None
    assert (profile.trigger.address, profile.trigger.value, profile.trigger.wait_s) == (8, 12, 0.1)
    assert {f.quantity: (f.unit, f.scale) for f in profile.fields} == {
        "distance": ("m", 0.01),
        "temperature": ("Cel", 0.1),
    }


def test_a_profile_file_by_path_loads(tmp_path: Path) -> None:
    path = tmp_path / "meter.toml"
    path.write_text((PACKAGE / "profiles" / "sdm120.toml").read_text())
    assert load_profile(str(path)).fields == load_profile("sdm120").fields


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "colour"),
        ("unit_id = 300\n", "unit_id"),
        ("baud = 1234\n", "baud"),
        ("max_gap = { 5 = 1 }\n", "max_gap.5"),
        ("holes = [{ function = 4, first = 9, last = 2 }]\n", "holes[0].last"),
        ("trigger = { address = 1 }\n", "trigger.value"),
        ("[[registers]]\nquantity = 'x'\nfunction = 4\naddress = 0\ntype = 'float64'\n",
         "registers[1].type"),
        ("[[registers]]\nquantity = 'x'\nfunction = 5\naddress = 0\ntype = 'int16'\n",
         "registers[1].function"),
        ("[[registers]]\nquantity = 'Bad Name'\nfunction = 4\naddress = 0\ntype = 'int16'\n",
         "registers[1].quantity"),
        ("[[registers]]\nquantity = 'y'\nfunction = 4\ntype = 'int16'\n", "registers[1].address"),
        ("[[registers]]\nquantity = 'co2'\nfunction = 4\naddress = 9\ntype = 'int16'\n",
         "registers[1].quantity"),
        ("[[registers]]\nquantity = 'z'\nfunction = 4\naddress = 0\ntype = 'int16'\nscale = 'x'\n",
         "registers[1].scale"),
    ],
)  # fmt: skip
def test_profile_errors_name_the_key(text: str, key: str) -> None:
    base = "[[registers]]\nquantity = 'co2'\nfunction = 4\naddress = 3\ntype = 'uint16'\n"
    settings, _, fields = text.partition("[[registers]]")
    table = tomllib.loads(settings + base + (f"[[registers]]{fields}" if fields else ""))
    with pytest.raises(ProfileError) as info:
        profile_from_table("test", table)
    assert info.value.key == key


def test_a_field_inside_a_declared_hole_is_refused() -> None:
    table = {
        "holes": [{"function": 4, "first": 4, "last": 20}],
        "registers": [{"quantity": "pwm", "function": 4, "address": 10, "type": "uint16"}],
    }
    with pytest.raises(ProfileError, match="unreadable"):
        profile_from_table("test", table)


# -- sensor options ---------------------------------------------------------------------------


def test_sample_config_is_accepted_and_both_sensors_share_one_bus() -> None:
    sensors = _sample()
    options = [family("modbus").parse_options(sid, table) for sid, table in sensors.items()]
    assert all(isinstance(o, ModbusOptions) for o in options)
    meter, co2 = options
    assert isinstance(meter, ModbusOptions)
    assert isinstance(co2, ModbusOptions)
    assert meter.bus == co2.bus == BusSettings("/dev/ttyUSB0", 9600, "N", 1)
    assert (meter.unit_id, meter.period_s, meter.profile.name) == (1, 10.0, "sdm630")
    assert (co2.unit_id, co2.period_s, co2.profile.name) == (2, 4.0, "senseair_s8")


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


def test_profile_defaults_apply_when_only_port_and_profile_are_given() -> None:
    options = FAMILY.parse_options("m", {"port": "/dev/ttyUSB1", "profile": "sdm120"})
    assert isinstance(options, ModbusOptions)
    assert options.bus == BusSettings("/dev/ttyUSB1", 2400, "N", 1)
    assert (options.unit_id, options.period_s) == (1, 10.0)


def test_tcp_port_names_a_tcp_bus() -> None:
    options = FAMILY.parse_options("m", {"port": "tcp://10.0.0.5:502", "profile": "sdm630"})
    assert isinstance(options, ModbusOptions)
    assert (options.bus.is_tcp, options.bus.host, options.bus.tcp_port) == (True, "10.0.0.5", 502)


def test_overrides_replace_the_profile_settings_and_replan() -> None:
    table = {
        "port": "/dev/ttyUSB0",
        "profile": "sdm120",
        "word_order": "CDAB",
        "max_gap": 40,
        "timeout_ms": 800,
        "retries": 0,
        "min_idle_ms": 100,
    }
    options = FAMILY.parse_options("m", table)
    assert isinstance(options, ModbusOptions)
    profile = options.profile
    assert {f.word_order for f in profile.fields} == {"CDAB"}
    assert [(r.start, r.count) for r in profile.reads] == [(0, 76)]  # the gap is filled now
    assert (profile.timeout_s, profile.retries, profile.min_idle_s) == (0.8, 0, 0.1)


def test_an_inline_register_map_is_a_profile_of_the_sensor() -> None:
    table = {
        "port": "tcp://127.0.0.1:5020",
        "unit_id": 7,
        "max_gap": 4,
        "registers": [
            {"quantity": "temperature", "unit": "Cel", "function": 3, "address": 10,
             "type": "int16", "scale": 0.1},
            {"quantity": "humidity", "unit": "%RH", "function": 3, "address": 12,
             "type": "uint16", "scale": 0.1},
        ],
    }  # fmt: skip
    options = FAMILY.parse_options("th_1", table)
    assert isinstance(options, ModbusOptions)
    assert options.profile.name == "th_1"
    assert options.unit_id == 7
    assert [(r.function, r.start, r.count) for r in options.profile.reads] == [(3, 10, 3)]


@pytest.mark.parametrize(
    ("changes", "key", "detail"),
    [
        ({"port": None}, "port", "missing"),
        ({"port": 5}, "port", "serial device"),
        ({"port": "tcp://nohost"}, "port", "tcp://HOST:PORT"),
        ({"port": "udp://h:1"}, "port", "only serial"),
        ({"profile": "nosuch"}, "profile", "shipped: sdm120"),
        ({"profile": "/nonexistent/map.toml"}, "profile", "cannot read"),
        ({"registers": []}, "profile", "either profile"),
        ({"unit_id": 256}, "unit_id", "between 0 and 255"),
        ({"unit_id": "1"}, "unit_id", "integer"),
        ({"baud": 9601}, "baud", "must be one of"),
        ({"parity": "X"}, "parity", "'N'"),
        ({"period_s": 0}, "period_s", "between"),
        ({"timeout_ms": -1}, "timeout_ms", "between"),
        ({"retries": 11}, "retries", "between"),
        ({"word_order": "ABDC"}, "word_order", "'CDAB'"),
        ({"max_gap": True}, "max_gap", "integer"),
        ({"colour": "blue"}, "colour", "unknown option"),
    ],
)
def test_bad_option_raises_option_error_naming_the_key(
    changes: dict[str, Any], key: str, detail: str
) -> None:
    table = {**_sample()["meter_1"], **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("meter_1", table)
    assert info.value.key == key
    assert detail in info.value.message


def test_an_inline_map_error_names_registers_and_the_entry() -> None:
    table = {
        "port": "/dev/ttyUSB0",
        "registers": [{"quantity": "x", "function": 4, "address": 0, "type": "int8"}],
    }
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("m", table)
    assert info.value.key == "registers"
    assert info.value.message.startswith("[0].type: must be one of")


def test_a_broken_profile_file_is_reported_under_profile_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[registers]]\nquantity = 'x'\nfunction = 4\naddress = 0\ntype = 'int8'\n")
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("m", {"port": "/dev/ttyUSB0", "profile": str(path)})
    assert info.value.key == "profile"
    assert f"{path}: registers[0].type" in info.value.message


def test_create_rejects_options_of_another_family() -> None:
    with pytest.raises(TypeError):
        FAMILY.create("m", {"port": "/dev/ttyUSB0"})


def test_created_driver_is_unavailable_until_it_runs() -> None:
    driver = FAMILY.create("meter_1", FAMILY.parse_options("meter_1", _sample()["meter_1"]))
    state = driver.state()
    assert driver.sensor_id == "meter_1"
    assert (state.available, state.reason) == (False, "not started")
    assert {"polls", "readings", "no_answer", "exceptions", "status_rejected"} <= set(
        state.counters
    )
