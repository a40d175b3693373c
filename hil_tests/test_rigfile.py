"""Rig files load into typed specs, and every mistake is named by file, line and key.

Data-driven cases live in hil_tests/cases/rigs/<name>/: `rig.toml` and the
exact issue lines in `expected.txt` (the file named `rig.toml`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hil_tests.rigfile import RigError, agent_table, load_rig

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases" / "rigs"
RIGS = HERE / "rigs"


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_case_folder_gives_exactly_the_expected_issues(case: str) -> None:
    path = CASES / case / "rig.toml"
    with pytest.raises(RigError) as caught:
        load_rig(path)
    assert {issue.file for issue in caught.value.issues} == {str(path)}
    got = [f"rig.toml:{i.line}: {i.key}: {i.message}" for i in caught.value.issues]
    assert got == (CASES / case / "expected.txt").read_text().splitlines()
    assert str(path) in str(caught.value)  # the message a person reads names the file too


@pytest.mark.parametrize("rig", sorted(p.name for p in RIGS.glob("*.toml")))
def test_shipped_rigs_load(rig: str) -> None:
    spec = load_rig(RIGS / rig)
    assert spec.sensors
    assert spec.name


def test_missing_file_is_named() -> None:
    with pytest.raises(RigError, match=r"nowhere\.toml:0: file: no such file"):
        load_rig(HERE / "nowhere.toml")


def test_default_emulated_rig_has_every_transport_and_every_injector() -> None:
    spec = load_rig(RIGS / "emulated.toml")
    assert spec.emulated
    assert {s.transport for s in spec.sensors} == {"serial", "modbus-rtu", "modbus-tcp", "ble"}
    assert spec.faults == {"network", "broker", "power", "disk", "clock", "sensors"}


def test_real_rig_defaults_to_every_injector_but_sensor_faults(tmp_path: Path) -> None:
    path = tmp_path / "bench.toml"
    path.write_text(
        '[rig]\nkind = "real"\n\n'
        '[sensors.meter_1]\nfamily = "modbus"\ntransport = "modbus-rtu"\n'
        'port = "/dev/ttyUSB0"\nprofile = "sdm120"\nunit_id = 7\noptions = { period_s = 5.0 }\n'
    )
    spec = load_rig(path)
    assert (spec.name, spec.emulated) == ("bench", False)
    assert spec.faults == {"network", "broker", "power", "disk", "clock"}
    assert agent_table(spec.sensor("meter_1")) == {
        "driver": "modbus",
        "port": "/dev/ttyUSB0",
        "profile": "sdm120",
        "unit_id": 7,
        "period_s": 5.0,
    }


def test_emulated_ble_sensor_gets_a_stable_address_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "ble.toml"
    path.write_text(
        '[rig]\nkind = "emulated"\n\n'
        '[sensors.tag_1]\nfamily = "ruuvi"\ntransport = "ble"\n'
        '[sensors.tag_2]\nfamily = "ruuvi"\ntransport = "ble"\n'
    )
    first, second = (load_rig(path).sensor(s).address for s in ("tag_1", "tag_2"))
    assert first is not None
    assert second is not None
    assert first != second
    assert first == load_rig(path).sensor("tag_1").address
