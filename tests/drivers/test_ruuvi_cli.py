"""`citygate decode ruuvi`: every DF5 and DF6 vector through the real command line, once per file.

The vectors name their fields descriptively (temperature_c, acc_x_mg ...);
the map below turns them into our quantity names and units (DESIGN.md §5).
Fields that are not measurements (sequence, MAC, flags) are not printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors"
G = 9.80665

# vector field -> (quantity, unit, factor from the vector's unit to ours)
FIELDS: dict[str, tuple[str, str, float]] = {
    "temperature_c": ("temperature", "Cel", 1.0),
    "humidity_pct": ("humidity", "%RH", 1.0),
    "pressure_pa": ("pressure", "Pa", 1.0),
    "acc_x_mg": ("acceleration_x", "m/s2", G / 1000),
    "acc_y_mg": ("acceleration_y", "m/s2", G / 1000),
    "acc_z_mg": ("acceleration_z", "m/s2", G / 1000),
    "tx_power_dbm": ("tx_power", "dBm", 1.0),
    "battery_mv": ("battery", "V", 1 / 1000),
    "movement_counter": ("movement_count", "/", 1.0),
    "pm2_5_ugm3": ("pm2_5", "ug/m3", 1.0),
    "co2_ppm": ("co2", "ppm", 1.0),
    "voc_index": ("voc_index", "/", 1.0),
    "nox_index": ("nox_index", "/", 1.0),
    "luminosity_lux": ("illuminance", "lx", 1.0),
}
NOT_RECORDS = {"measurement_sequence", "mac", "mac_low24", "calibration_in_progress", "company_id"}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def _check(vector: dict[str, Any], got: dict[str, Any]) -> None:
    label = vector["id"]
    if vector.get("expect_error"):
        assert got["ok"] is False, label
        assert got["error"].strip(), label
        return
    assert got["ok"] is True, label
    records = {r["n"]: (r["u"], r["v"]) for r in got["records"]}
    assert len(records) == len(got["records"]), f"{label}: a quantity printed twice"
    for field, expected in vector["expect"].items():
        if field in NOT_RECORDS:
            continue
        quantity, unit, factor = FIELDS[field]  # a new vector field must be mapped here
        if expected is None:
            assert quantity not in records, f"{label}: {quantity} is 'not available'"
        else:
            assert records[quantity][0] == unit, label
            assert records[quantity][1] == pytest.approx(expected * factor, abs=1e-6), label
    if not records:
        assert got["note"], f"{label}: a payload without measurements needs a note"


@pytest.mark.parametrize("name", ["ruuvi_df5", "ruuvi_df6"])
def test_every_vector_decodes_through_the_command_line(name: str) -> None:
    data = _load(name)
    cases = list(data["vectors"])
    if name == "ruuvi_df6":  # the luminosity table, spliced into the official valid payload
        valid = bytes.fromhex(cases[0]["hex"])
        for row in data["luminosity_codes"]:
            payload = valid[:13] + bytes([row["code"]]) + valid[14:]
            cases.append(
                {
                    "id": f"lux_code_{row['code']}",
                    "hex": payload.hex(),
                    "expect": {"luminosity_lux": row["lux"]},
                }
            )
    result = citygate("decode", "ruuvi", *[case["hex"] for case in cases])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(cases), result.stderr
    for case, got in zip(cases, lines, strict=True):
        _check(case, got)
    failures = sum(1 for case in cases if case.get("expect_error"))
    assert result.returncode == (1 if failures else 0)


def test_bad_input_is_refused_per_payload_with_a_reason_and_a_failing_status() -> None:
    valid = _load("ruuvi_df5")["vectors"][0]["hex"]
    result = citygate("decode", "ruuvi", valid, "0512FC", "0201061AFF990405")
    first, short, whole_but_cut = (json.loads(line) for line in result.stdout.splitlines())
    assert first["ok"] is True
    assert short == {"ok": False, "error": "data format 5 payload is 3 bytes, expected 24"}
    assert whole_but_cut["ok"] is False
    assert whole_but_cut["error"]
    assert result.returncode == 1
