"""Ruuvi DF5/DF6 codec: official vectors, sentinels, encoder round trips and arbitrary bytes."""

from __future__ import annotations

import ast
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.ruuvi import FAMILY, codec
from drivers.ruuvi.codec import RuuviError
from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors"
PACKAGE = Path(codec.__file__).parent
G = 9.80665

# vector field -> (our quantity, factor from the vector's unit to ours)
FIELD_TO_QUANTITY: dict[str, tuple[str, float]] = {
    "temperature_c": ("temperature", 1.0),
    "humidity_pct": ("humidity", 1.0),
    "pressure_pa": ("pressure", 1.0),
    "acc_x_mg": ("acceleration_x", G / 1000),
    "acc_y_mg": ("acceleration_y", G / 1000),
    "acc_z_mg": ("acceleration_z", G / 1000),
    "tx_power_dbm": ("tx_power", 1.0),
    "battery_mv": ("battery", 1 / 1000),
    "movement_counter": ("movement_count", 1.0),
    "pm2_5_ugm3": ("pm2_5", 1.0),
    "co2_ppm": ("co2", 1.0),
    "voc_index": ("voc_index", 1.0),
    "nox_index": ("nox_index", 1.0),
    "luminosity_lux": ("illuminance", 1.0),
}
UNITS = {
    "temperature": "Cel",
    "humidity": "%RH",
    "pressure": "Pa",
    "acceleration_x": "m/s2",
    "acceleration_y": "m/s2",
    "acceleration_z": "m/s2",
    "battery": "V",
    "tx_power": "dBm",
    "movement_count": "/",
    "pm2_5": "ug/m3",
    "co2": "ppm",
    "voc_index": "/",
    "nox_index": "/",
    "illuminance": "lx",
}


def _vector_file(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def _all_vectors() -> list[dict[str, Any]]:
    return [v for name in ("ruuvi_df5", "ruuvi_df6") for v in _vector_file(name)["vectors"]]


def _values(records: list[tuple[str, str, float]]) -> dict[str, float]:
    values = {quantity: value for quantity, _unit, value in records}
    assert len(values) == len(records), "a Ruuvi payload holds each quantity once"
    return values


def _payload(vector: dict[str, Any]) -> bytes:
    raw = bytes.fromhex(vector["hex"])
    return codec.from_advertisement(raw) if vector.get("kind") == "adv" else raw


def _check_field(data: bytes, values: dict[str, float], field: str, expected: Any) -> None:
    if field in FIELD_TO_QUANTITY:
        quantity, factor = FIELD_TO_QUANTITY[field]
        if expected is None:
            assert quantity not in values
        else:
            assert values[quantity] == pytest.approx(expected * factor, abs=0.006)
    elif field == "measurement_sequence":
        assert codec.measurement_sequence(data) == expected
    elif field in ("mac", "mac_low24"):
        assert codec.mac_of(data) == expected
    elif field == "calibration_in_progress":
        assert codec.calibration_in_progress(data) is expected
    elif field == "company_id":
        assert expected == codec.COMPANY_ID
    else:
        pytest.fail(f"vector field {field!r} is not mapped")


@pytest.mark.parametrize("vector", _all_vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_decodes_as_documented(vector: dict[str, Any]) -> None:
    data = _payload(vector)
    if vector.get("expect_error"):
        with pytest.raises(RuuviError, match=r"\S"):
            codec.decode(data)
        return
    records = codec.decode(data)
    assert all(unit == UNITS[quantity] for quantity, unit, _v in records)
    values = _values(records)
    for field, expected in vector["expect"].items():
        _check_field(data, values, field, expected)


@pytest.mark.parametrize(
    "row", _vector_file("ruuvi_df6")["luminosity_codes"], ids=lambda r: str(r["code"])
)
def test_luminosity_code_table_matches_the_formula(row: dict[str, Any]) -> None:
    assert codec.lux_of_code(row["code"]) == pytest.approx(row["lux"], abs=0.005)


def test_every_luminosity_code_survives_encoding_its_decoded_value() -> None:
    assert [codec.code_of_lux(codec.lux_of_code(c)) for c in range(255)] == list(range(255))


def test_official_valid_df5_gives_our_names_and_units() -> None:
    data = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    assert codec.decode(data) == [
        ("temperature", "Cel", 24.3),
        ("humidity", "%RH", 53.49),
        ("pressure", "Pa", 100044.0),
        ("acceleration_x", "m/s2", 0.0392266),
        ("acceleration_y", "m/s2", -0.0392266),
        ("acceleration_z", "m/s2", 10.1596894),
        ("battery", "V", 2.977),
        ("tx_power", "dBm", 4.0),
        ("movement_count", "/", 66.0),
    ]


# -- sentinels ---------------------------------------------------------------------------

DF5_VALID = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
DF6_VALID = bytes.fromhex("06170C5668C79E007000C90501D9FFCD004C884F")


def _patched(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch) :]


@pytest.mark.parametrize(
    ("offset", "patch", "missing"),
    [
        (1, b"\x80\x00", {"temperature"}),
        (3, b"\xff\xff", {"humidity"}),
        (5, b"\xff\xff", {"pressure"}),
        (7, b"\x80\x00", {"acceleration_x"}),
        (9, b"\x80\x00", {"acceleration_y"}),
        (11, b"\x80\x00", {"acceleration_z"}),
        (13, bytes([0xFF, 0xE4]), {"battery"}),  # 2047 << 5 | 4
        (13, bytes([0xAC, 0x3F]), {"tx_power"}),  # battery kept, tx 31
        (15, b"\xff", {"movement_count"}),
    ],
)
def test_df5_sentinel_omits_only_that_quantity(
    offset: int, patch: bytes, missing: set[str]
) -> None:
    full = set(_values(codec.decode(DF5_VALID)))
    got = _values(codec.decode(_patched(DF5_VALID, offset, patch)))
    assert set(got) == full - missing


@pytest.mark.parametrize(
    ("offset", "patch", "missing"),
    [
        (1, b"\x80\x00", {"temperature"}),
        (3, b"\xff\xff", {"humidity"}),
        (5, b"\xff\xff", {"pressure"}),
        (7, b"\xff\xff", {"pm2_5"}),
        (9, b"\xff\xff", {"co2"}),
        (13, b"\xff", {"illuminance"}),
    ],
)
def test_df6_sentinel_omits_only_that_quantity(
    offset: int, patch: bytes, missing: set[str]
) -> None:
    full = set(_values(codec.decode(DF6_VALID)))
    got = _values(codec.decode(_patched(DF6_VALID, offset, patch)))
    assert set(got) == full - missing


def test_df6_voc_and_nox_are_invalid_only_with_their_flag_bit() -> None:
    both_bytes_ff = _patched(_patched(DF6_VALID, 11, b"\xff\xff"), 16, b"\x00")
    assert _values(codec.decode(both_bytes_ff))["voc_index"] == 510
    voc_invalid = _patched(both_bytes_ff, 16, b"\x40")
    assert "voc_index" not in _values(codec.decode(voc_invalid))
    assert _values(codec.decode(voc_invalid))["nox_index"] == 510
    nox_invalid = _patched(both_bytes_ff, 16, b"\x80")
    assert "nox_index" not in _values(codec.decode(nox_invalid))


def test_df5_sequence_and_mac_sentinels_give_none() -> None:
    data = _patched(_patched(DF5_VALID, 16, b"\xff\xff"), 18, b"\xff" * 6)
    assert codec.measurement_sequence(data) is None
    assert codec.mac_of(data) is None
    assert codec.decode(data) == codec.decode(DF5_VALID)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty payload"),
        (bytes([3]) + bytes(13), "unsupported data format 0x03"),
        (DF5_VALID[:23], "data format 5 payload is 23 bytes, expected 24"),
        (DF5_VALID + b"\x00", "payload is 25 bytes"),
        (DF6_VALID[:19], "data format 6 payload is 19 bytes, expected 20"),
    ],
)
def test_bad_payloads_are_rejected_with_a_precise_reason(data: bytes, reason: str) -> None:
    for function in (codec.decode, codec.measurement_sequence, codec.mac_of):
        with pytest.raises(RuuviError, match=reason):
            function(data)


def test_ruuvi_error_is_a_value_error() -> None:
    assert issubclass(RuuviError, ValueError)


def test_advertisement_without_ruuvi_data_is_rejected() -> None:
    with pytest.raises(RuuviError, match="no manufacturer data with company id 0x0499"):
        codec.from_advertisement(bytes.fromhex("020106 05FF4C000215"))
    with pytest.raises(RuuviError, match="overruns"):
        codec.from_advertisement(bytes.fromhex("020106 1BFF9904 05"))


# -- encoder -----------------------------------------------------------------------------


def test_encoding_the_official_values_gives_the_official_bytes() -> None:
    values = _values(codec.decode(DF5_VALID))
    movement = int(values.pop("movement_count"))
    assert codec.encode_df5(values, 205, "cb:b8:33:4c:88:4f", movement) == DF5_VALID
    df6 = codec.encode_df6(_values(codec.decode(DF6_VALID)), 205, "AA:BB:CC:4C:88:4F")
    assert codec.decode(df6) == codec.decode(DF6_VALID)
    assert (codec.measurement_sequence(df6), codec.mac_of(df6)) == (205, "4C:88:4F")


def test_missing_values_are_encoded_as_the_official_invalid_payload() -> None:
    invalid = bytes.fromhex("058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF")
    assert codec.encode_df5({}, 0xFFFF, "FF:FF:FF:FF:FF:FF", movement=255) == invalid
    df6 = codec.encode_df6({}, 7)
    assert (codec.decode(df6), codec.mac_of(df6), codec.measurement_sequence(df6)) == ([], None, 7)


def test_out_of_range_values_are_clipped_like_the_firmware() -> None:
    values = {"temperature": 500.0, "humidity": -3.0, "pressure": 2e5, "battery": 9.0}
    got = _values(codec.decode(codec.encode_df5(values, 1, "00:00:00:00:00:01")))
    assert (got["temperature"], got["humidity"], got["pressure"], got["battery"]) == (
        163.835,
        0.0,
        115534.0,
        3.646,
    )
    assert _values(codec.decode(codec.encode_df5({"tx_power": 99.0}, 1, "00" * 6)))[
        "tx_power"
    ] == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: codec.encode_df5({}, 1, "AA:BB"), "does not have 6 bytes"),
        (lambda: codec.encode_df5({}, 1, "GG:BB:CC:DD:EE:FF"), "not hexadecimal"),
        (lambda: codec.encode_df5({}, 70000, "AA:BB:CC:DD:EE:FF"), "sequence 70000"),
        (lambda: codec.encode_df5({}, 1, "AA:BB:CC:DD:EE:FF", 256), "movement counter 256"),
        (lambda: codec.encode_df5({"humidity": math.nan}, 1, "00" * 6), "humidity value nan"),
        (lambda: codec.encode_df6({"illuminance": math.inf}, 1), "illuminance value inf"),
    ],
)
def test_encoder_rejects_what_it_cannot_send(call: Any, reason: str) -> None:
    with pytest.raises(RuuviError, match=reason):
        call()


def _df5_arguments(data: bytes) -> tuple[dict[str, float], int, str, int]:
    values = _values(codec.decode(data))
    movement = int(values.pop("movement_count", 255))
    sequence = codec.measurement_sequence(data)
    mac = codec.mac_of(data)
    return values, 0xFFFF if sequence is None else sequence, mac or "FF:FF:FF:FF:FF:FF", movement


@given(body=st.binary(min_size=23, max_size=23))
def test_every_df5_payload_is_re_encoded_byte_for_byte(body: bytes) -> None:
    data = bytes([5]) + body
    assert codec.encode_df5(*_df5_arguments(data)) == data


@given(
    body=st.binary(min_size=19, max_size=19), voc_nox_bits=st.sampled_from([0, 0x40, 0x80, 0xC0])
)
def test_every_df6_payload_without_extra_flags_is_re_encoded_byte_for_byte(
    body: bytes, voc_nox_bits: int
) -> None:
    # the encoder writes the reserved/sound field as "not available" and only the VOC/NOx flags
    data = bytes([6]) + body[:13] + b"\xff" + body[14:15] + bytes([0x10 | voc_nox_bits]) + body[16:]
    encoded = codec.encode_df6(
        _values(codec.decode(data)), codec.measurement_sequence(data) or 0, codec.mac_of(data)
    )
    assert encoded == data


@given(
    temperature=st.floats(-163.8, 163.8),
    humidity=st.floats(0, 100),
    pressure=st.floats(50000, 115534),
    acc=st.floats(-300, 300),
    battery=st.floats(1.6, 3.646),
    tx_power=st.sampled_from([-40.0, -20.0, -8.0, 0.0, 4.0, 8.0, 20.0]),
    movement=st.integers(0, 254),
    sequence=st.integers(0, 65534),
)
def test_df5_values_survive_a_round_trip_within_one_step(
    temperature: float,
    humidity: float,
    pressure: float,
    acc: float,
    battery: float,
    tx_power: float,
    movement: int,
    sequence: int,
) -> None:
    sent = {
        "temperature": temperature,
        "humidity": humidity,
        "pressure": pressure,
        "acceleration_x": acc,
        "acceleration_y": -acc,
        "acceleration_z": acc / 2,
        "battery": battery,
        "tx_power": tx_power,
    }
    data = codec.encode_df5(sent, sequence, "C9:44:54:29:E3:8D", movement)
    got = _values(codec.decode(data))
    steps = {"temperature": 0.005, "humidity": 0.0025, "pressure": 1, "battery": 0.001}
    for name, value in sent.items():
        assert got[name] == pytest.approx(value, abs=steps.get(name, G / 1000) / 2 + 1e-9)
    assert got["movement_count"] == movement
    assert codec.measurement_sequence(data) == sequence
    assert codec.mac_of(data) == "C9:44:54:29:E3:8D"


@given(
    pm2_5=st.floats(0, 1000),
    co2=st.floats(0, 40000),
    voc=st.integers(1, 500),
    nox=st.integers(1, 500),
    lux=st.floats(0, 65535),
)
def test_df6_values_survive_a_round_trip_within_one_step(
    pm2_5: float, co2: float, voc: int, nox: int, lux: float
) -> None:
    sent = {"pm2_5": pm2_5, "co2": co2, "voc_index": voc, "nox_index": nox, "illuminance": lux}
    got = _values(codec.decode(codec.encode_df6(sent, 300)))
    assert got["pm2_5"] == pytest.approx(pm2_5, abs=0.05 + 1e-9)
    assert got["co2"] == pytest.approx(co2, abs=0.5)
    assert (got["voc_index"], got["nox_index"]) == (voc, nox)
    # one luminosity step is a factor 65536 ** (1/254) = 1.0446: half of it either side
    assert (got["illuminance"] + 1) / (lux + 1) == pytest.approx(1, abs=0.0225)


# -- arbitrary bytes ---------------------------------------------------------------------

ruuvi_like = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=23, max_size=23).map(lambda b: b"\x05" + b),
    st.binary(min_size=19, max_size=19).map(lambda b: b"\x06" + b),
)


@given(data=ruuvi_like)
def test_any_bytes_give_records_or_a_ruuvi_error(data: bytes) -> None:
    try:
        records = codec.decode(data)
    except RuuviError:
        return
    assert all(isinstance(v, float) and math.isfinite(v) for _q, _u, v in records)
    assert all(unit == UNITS[quantity] for quantity, unit, _v in records)
    codec.measurement_sequence(data)
    codec.mac_of(data)


@given(adv=st.binary(max_size=64))
def test_any_advertisement_gives_a_payload_or_a_ruuvi_error(adv: bytes) -> None:
    try:
        payload = codec.from_advertisement(adv)
    except RuuviError:
        return
    assert b"\xff\x99\x04" + payload in adv


def test_codec_imports_nothing_so_it_runs_on_micropython() -> None:
    tree = ast.parse((PACKAGE / "codec.py").read_text())
    assert [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)] == []


# -- through the family and the command line ----------------------------------------------


@pytest.mark.parametrize("name", ["ruuvi_df5", "ruuvi_df6"])
def test_every_vector_decodes_as_documented_through_the_command_line(name: str) -> None:
    vectors = _vector_file(name)["vectors"]
    result = citygate("decode", "ruuvi", *[v["hex"] for v in vectors])
    lines = result.stdout.splitlines()
    assert len(lines) == len(vectors), result.stderr
    for vector, line in zip(vectors, lines, strict=True):
        got = json.loads(line)
        if vector.get("expect_error"):
            assert got["ok"] is False, vector["id"]
            assert got["error"], vector["id"]
            continue
        assert got["ok"] is True, vector["id"]
        values = {r["n"]: r["v"] for r in got["records"]}
        assert all(r["u"] == UNITS[r["n"]] for r in got["records"]), vector["id"]
        for field, expected in vector["expect"].items():
            if field in FIELD_TO_QUANTITY:
                quantity, factor = FIELD_TO_QUANTITY[field]
                if expected is None:
                    assert quantity not in values, vector["id"]
                else:
                    assert values[quantity] == pytest.approx(expected * factor, abs=0.006)
        if not values:
            assert got["note"], vector["id"]
    assert result.returncode == 0


def test_command_line_rejects_a_bad_payload_with_the_codec_reason() -> None:
    result = citygate("decode", "ruuvi", "0512FC")
    assert json.loads(result.stdout) == {
        "ok": False,
        "error": "data format 5 payload is 3 bytes, expected 24",
    }
    assert result.returncode == 1


def test_family_decodes_a_payload_like_the_codec() -> None:
    assert FAMILY.decode(DF5_VALID, {}).records == codec.decode(DF5_VALID)


def test_sample_config_is_accepted_by_the_family() -> None:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        sensors: dict[str, Any] = tomllib.load(fh)["sensors"]
    [(sensor_id, table)] = sensors.items()
    assert table["driver"] == FAMILY.name == "ruuvi"
    FAMILY.parse_options(sensor_id, table)


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()
