"""Modbus codec: every vector through `citygate decode`, CRC, timing, fields, properties."""

from __future__ import annotations

import ast
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import FAMILY, codec
from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors"
PACKAGE = Path(codec.__file__).parent
FILES = ("eastron_sdm120", "eastron_sdm630", "senseair_s8", "dfrobot_urm13_modbus")
# vector field -> raw record name (`address` in a vector is the unit address)
RAW_NAMES = {
    "address": "unit_id",
    "function": "function",
    "start": "start",
    "quantity": "quantity",
    "exception_code": "exception_code",
    "register": "address",
    "value": "value",
}


def _file(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def _vectors(name: str) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in _file(name)["vectors"]}


def _decode_cli(*hexes: str, profile: str | None = None) -> list[dict[str, Any]]:
    extra = ["--profile", profile] if profile else []
    result = citygate("decode", "modbus", *extra, *hexes)
    lines = result.stdout.splitlines()
    assert len(lines) == len(hexes), result.stderr
    return [json.loads(line) for line in lines]


def _records(result: dict[str, Any]) -> dict[str, float]:
    assert result["ok"], result
    return {r["n"]: r["v"] for r in result["records"]}


# -- raw frames: every vector of the four device files ------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_every_frame_vector_decodes_raw_through_the_cli(name: str) -> None:
    vectors = [v for v in _file(name)["vectors"] if v["kind"] != "float"]  # floats: see below
    results = _decode_cli(*(v["hex"] for v in vectors))
    for vector, result in zip(vectors, results, strict=True):
        if vector.get("expect_error"):
            assert result["ok"] is False, vector["id"]
            assert result["error"], vector["id"]
            continue
        values = _records(result)
        for key, expected in vector["expect"].items():
            if key in RAW_NAMES:
                assert values[RAW_NAMES[key]] == expected, (vector["id"], key)
            elif key == "registers":
                got = [values[f"register_{i}"] for i in range(len(expected))]
                assert got == expected, vector["id"]
                assert f"register_{len(expected)}" not in values


def test_the_printed_errata_are_refused_for_their_crc() -> None:
    for frame in ("01 03 00 00 00 14 C4 0B", "01 10 00 14 00 02 04 42 70 00 00 67 D5"):
        with pytest.raises(codec.ModbusFrameError, match="bad CRC"):
            codec.decode(bytes.fromhex(frame))


# -- readings with a profile: request + reply, or a reply the profile's plan identifies ----------


def _hex(name: str, vector_id: str) -> str:
    return str(_vectors(name)[vector_id]["hex"])


def _request(unit: int, function: int, start: int, count: int) -> str:
    return codec.read_request(unit, function, start, count).hex()


def _eastron_variants(tmp_path: Path) -> tuple[str, str]:
    """A CDAB copy of sdm120, and a map of the two holding-register floats the vectors use."""
    cdab = tmp_path / "sdm120_cdab.toml"
    shipped = (PACKAGE / "profiles" / "sdm120.toml").read_text()
    cdab.write_text(shipped.replace('word_order = "ABCD"', 'word_order = "CDAB"'))
    holding = tmp_path / "eastron_holding.toml"
    holding.write_text(
        "[[registers]]\nquantity = 'demand_period'\nunit = 'min'\nfunction = 3\n"
        "address = 0\ntype = 'float32'\n"
        "[[registers]]\nquantity = 'node_address'\nfunction = 3\naddress = 20\ntype = 'float32'\n"
    )
    return str(cdab), str(holding)


_Case = tuple[str, str, str, str, Callable[[dict[str, Any]], dict[str, float]]]


def _profile_cases(tmp_path: Path) -> list[_Case]:
    """(file, vector id, profile, hex fed to the CLI, expected records from the vector's expect)."""
    cdab, holding = _eastron_variants(tmp_path)
    s120, s630, s8, urm = FILES
    return [
        (s120, "read_voltage_reply_230_2V", "sdm120",
         _hex(s120, "read_voltage_request") + _hex(s120, "read_voltage_reply_230_2V"),
         lambda e: {"voltage": e["floats"][0]}),
        (s120, "read_frequency_addr2_reply_49_98Hz", "sdm120",
         _hex(s120, "read_frequency_addr2_request")
         + _hex(s120, "read_frequency_addr2_reply_49_98Hz"),
         lambda e: {"frequency": e["floats"][0]}),
        (s120, "word_swapped_reply_cdab", cdab,
         _hex(s120, "read_voltage_request") + _hex(s120, "word_swapped_reply_cdab"),
         lambda e: {"voltage": e["floats_word_swapped"][0]}),
        (s120, "read_holding_reply_demand_time_1", holding,
         _hex(s120, "read_holding_request_corrected")
         + _hex(s120, "read_holding_reply_demand_time_1"),
         lambda e: {"demand_period": e["floats"][0]}),
        (s120, "write_node_60_corrected", holding, _hex(s120, "write_node_60_corrected"),
         lambda e: {"node_address": e["floats"][0]}),
        (s630, "float_example_240_5", "sdm630",
         _request(1, 4, 0, 2) + codec.read_reply(1, 4, [0x4370, 0x8000]).hex(),
         lambda e: {"voltage_l1": e["floats"][0]}),
        (s630, "read_3_voltages_reply", "sdm630",
         _hex(s630, "read_3_voltages_request") + _hex(s630, "read_3_voltages_reply"),
         lambda e: dict(zip(("voltage_l1", "voltage_l2", "voltage_l3"), e["floats"], strict=True))),
        (s630, "read_freq_and_import_reply", "sdm630",
         _hex(s630, "read_freq_and_import_request") + _hex(s630, "read_freq_and_import_reply"),
         lambda e: {"frequency": e["floats"][0], "energy_import": e["floats"][1] * 3.6e6}),
        (s630, "read_total_power_reply_export", "sdm630",
         _hex(s630, "read_total_power_request") + _hex(s630, "read_total_power_reply_export"),
         lambda e: {"active_power": e["floats"][0]}),
        (s8, "co2_read_reply_400ppm", "senseair_s8",
         _hex(s8, "co2_read_request") + _hex(s8, "co2_read_reply_400ppm"),
         lambda e: {"co2": e["co2_ppm"]}),
        (s8, "status_and_co2_reply", "senseair_s8", _hex(s8, "status_and_co2_reply"),
         lambda e: {"co2": e["co2_ppm"]}),
        (s8, "co2_904ppm_correct", "senseair_s8",
         _hex(s8, "co2_read_request") + _hex(s8, "co2_904ppm_correct"),
         lambda e: {"co2": e["co2_ppm"]}),
        (urm, "read_distance_response_200cm", "urm13",
         _hex(urm, "read_distance_request") + _hex(urm, "read_distance_response_200cm"),
         lambda e: {"distance": e["distance_cm"] / 100}),
        (urm, "internal_temperature_minus_10C", "urm13",
         _request(13, 3, 6, 1) + _hex(urm, "internal_temperature_minus_10C"),
         lambda e: {"temperature": e["int16_scaled_0_1"]}),
    ]  # fmt: skip


def test_vector_values_decode_to_quantities_with_a_profile(tmp_path: Path) -> None:
    # in process, through the same FAMILY.decode the CLI calls (one CLI run below)
    for name, vector_id, profile, text, expected in _profile_cases(tmp_path):
        decoded = FAMILY.decode(bytes.fromhex(text), {"profile": profile})
        got = {n: v for n, _u, v in decoded.records}
        want = expected(_vectors(name)[vector_id]["expect"])
        assert got.keys() == want.keys(), vector_id
        for quantity, value in want.items():
            assert got[quantity] == pytest.approx(value, rel=1e-6), (vector_id, quantity)


def test_the_cli_decodes_readings_warmup_and_exceptions_with_a_profile() -> None:
    s8 = "senseair_s8"
    frames = (
        _hex(s8, "co2_read_request") + _hex(s8, "co2_read_reply_400ppm"),
        _hex(s8, "status_and_co2_reply"),
        _hex(s8, "warmup_zero_out_of_range"),
        "FE 84 02 F2 F1",  # exception 02 to function 4 from unit 254
    )
    co2, both, warmup, exception = _decode_cli(*frames, profile=s8)
    assert co2 == both == {"ok": True, "records": [{"n": "co2", "u": "ppm", "v": 400.0}]}
    assert warmup == {
        "ok": True,
        "records": [],
        "note": "no reading: status meter_status 0x0020 (out of range)",
    }
    assert exception == {
        "ok": True,
        "records": [],
        "note": "exception 02 (illegal data address) to function 4",
    }


def test_every_value_vector_has_a_profile_case(tmp_path: Path) -> None:
    covered = {(c[0], c[1]) for c in _profile_cases(tmp_path)}
    covered.add(("senseair_s8", "warmup_zero_out_of_range"))  # no reading: tested below
    value_keys = {"floats", "floats_word_swapped", "co2_ppm", "distance_cm", "int16_scaled_0_1"}
    for name in FILES:
        for vector in _file(name)["vectors"]:
            if value_keys & set(vector.get("expect", {})):
                assert (name, vector["id"]) in covered, vector["id"]


def _decode_error(text: str, profile: str) -> str:
    with pytest.raises(ValueError) as info:
        FAMILY.decode(bytes.fromhex(text), {"profile": profile})
    return str(info.value)


def test_lone_reply_the_plan_cannot_place_asks_for_the_request() -> None:
    lone = _hex("eastron_sdm120", "read_voltage_reply_230_2V")
    assert "give the request before the reply" in _decode_error(lone, "sdm120")


def test_reply_that_does_not_answer_the_request_is_refused() -> None:
    request = _request(2, 4, 0, 2)
    reply = _hex("eastron_sdm120", "read_voltage_reply_230_2V")  # from unit 1
    assert "does not answer" in _decode_error(request + reply, "sdm120")


def test_unknown_profile_names_the_shipped_ones() -> None:
    message = _decode_error("01 84 02 C2 C1", "nosuch")
    assert "sdm120" in message
    assert "urm13" in message


# -- common framing: CRC, timing, TCP -----------------------------------------------------


COMMON = _file("modbus_rtu_common")


@pytest.mark.parametrize("vector", COMMON["crc_vectors"], ids=lambda v: str(v["id"]))
def test_crc_matches_the_catalogue_and_the_documents(vector: dict[str, Any]) -> None:
    data = (
        vector["data_ascii"].encode()
        if "data_ascii" in vector
        else bytes.fromhex(vector["data_hex"])
    )
    assert codec.crc16(data) == int(vector["crc"], 16)
    if "wire" in vector:
        assert codec.with_crc(data)[-2:] == bytes.fromhex(vector["wire"])
        assert codec.crc16(codec.with_crc(data)) == 0  # the whole frame checks to zero


@pytest.mark.parametrize("vector", COMMON["timing_vectors"], ids=lambda v: f"{v['baud']}")
def test_silent_intervals_follow_the_spec(vector: dict[str, Any]) -> None:
    bits = vector["bits_per_char"]
    assert codec.silent_interval_s(vector["baud"], bits) * 1000 == pytest.approx(
        vector["t35_ms"], abs=0.001
    )
    assert codec.inter_char_limit_s(vector["baud"], bits) * 1000 == pytest.approx(
        vector["t15_ms"], abs=0.001
    )


def test_common_frames_decode_through_the_cli_and_tcp_like_its_rtu_equivalent() -> None:
    crc_frames = [v["data_hex"] + v["wire"] for v in COMMON["crc_vectors"] if "wire" in v]
    vectors = COMMON["tcp_vectors"]
    tcp_hex = [v["hex"] for v in vectors]
    rtu_hex = [v["rtu_equivalent"] for v in vectors]
    results = _decode_cli(*crc_frames, *tcp_hex, *rtu_hex)
    assert all(result["ok"] for result in results[: len(crc_frames)])
    tcp = results[len(crc_frames) : len(crc_frames) + len(vectors)]
    rtu = results[len(crc_frames) + len(vectors) :]
    for tcp_result, rtu_result in zip(tcp, rtu, strict=True):
        tcp_records = _records(tcp_result)
        assert tcp_records.pop("transaction_id") == 1
        assert tcp_records == _records(rtu_result)


def test_tcp_adu_builder_matches_the_vector() -> None:
    pdu = codec.read_request_pdu(4, 0, 2)
    assert codec.tcp_adu(1, 1, pdu) == bytes.fromhex(COMMON["tcp_vectors"][0]["hex"])


# -- building frames ------------------------------------------------------------------------


def test_built_requests_match_the_documented_frames() -> None:
    assert codec.read_request(0xFE, 4, 3, 1).hex(" ") == "fe 04 00 03 00 01 d5 c5"
    assert codec.read_request(1, 4, 0, 2).hex(" ") == "01 04 00 00 00 02 71 cb"
    assert codec.write_single_request(0x0D, 8, 12).hex(" ") == "0d 06 00 08 00 0c 08 c1"
    assert codec.exception_reply(1, 4, 2).hex(" ") == "01 84 02 c2 c1"
    assert codec.read_reply(0xFE, 4, [400]).hex(" ") == "fe 04 02 01 90 ac d8"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("01 04", "at least 4"),
        ("01 04 00 00 00 02 71 CC", "bad CRC"),
        (codec.with_crc(bytes.fromhex("01 04 05 00 00")).hex(), "byte count 5 but 2"),
        (codec.with_crc(bytes.fromhex("01 04 01 00")).hex(), "is not 2-250 even"),
        (codec.with_crc(bytes.fromhex("01 04 00 00 00 7E")).hex(), "126 registers"),
        (codec.with_crc(bytes.fromhex("01 07")).hex(), "function 7 is not supported"),
        (codec.with_crc(bytes.fromhex("01 84 02 00")).hex(), "exception reply has 3"),
        ("00 01 00 01 00 06 01 04 00 00 00 02", "bad CRC"),
    ],
)
def test_bad_frames_are_rejected_with_a_precise_reason(frame: str, reason: str) -> None:
    with pytest.raises(codec.ModbusFrameError, match=reason):
        codec.decode(bytes.fromhex(frame))


# -- fields ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registers", "order"),
    [
        ([0x4366, 0x3334], "ABCD"),
        ([0x3334, 0x4366], "CDAB"),
        ([0x6643, 0x3433], "BADC"),
        ([0x3433, 0x6643], "DCBA"),
    ],
)
def test_every_word_order_gives_the_same_float(registers: list[int], order: str) -> None:
    assert codec.field_raw(registers, 0, "float32", order) == pytest.approx(230.2, rel=1e-6)


def test_integer_types_and_scaling() -> None:
    fields = [
        ("a", "", 0, "int16", "ABCD", 0.1, 0.0),
        ("b", "", 1, "uint16", "ABCD", 1.0, -40.0),
        ("c", "", 2, "int32", "CDAB", 1.0, 0.0),
        ("d", "", 4, "uint32", "ABCD", 0.001, 0.0),
    ]
    registers = [0xFF9C, 100, 0xFFFE, 0xFFFF, 0x0001, 0x0000]
    records, invalid = codec.decode_fields(fields, 0, registers)
    assert records == [
        ("a", "", pytest.approx(-10.0)),
        ("b", "", 60.0),
        ("c", "", -2.0),
        ("d", "", pytest.approx(65.536)),
    ]
    assert invalid == []


def test_nan_and_infinity_are_left_out_and_named() -> None:
    fields = [("x", "", 0, "float32", "ABCD", 1.0, 0.0), ("y", "", 2, "float32", "ABCD", 1.0, 0.0)]
    records, invalid = codec.decode_fields(fields, 0, [0x7FC0, 0, 0xFF80, 0])
    assert (records, invalid) == ([], ["x", "y"])


def test_fields_outside_the_block_are_skipped() -> None:
    fields = [("x", "", 10, "uint16", "ABCD", 1.0, 0.0), ("y", "", 11, "uint32", "ABCD", 1.0, 0.0)]
    assert codec.decode_fields(fields, 10, [7, 0]) == ([("x", "", 7.0)], [])


def test_codec_imports_nothing_so_it_runs_on_micropython() -> None:
    tree = ast.parse((PACKAGE / "codec.py").read_text())
    assert [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)] == []


# -- properties --------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_any_bytes_give_records_or_the_codec_error(data: bytes) -> None:
    try:
        records = codec.decode(data)
    except codec.ModbusFrameError as exc:
        reason = str(exc)
    else:
        assert all(isinstance(v, float) and u == "" for _n, u, v in records)
        return
    assert reason


@given(
    unit=st.integers(0, 255),
    function=st.sampled_from([3, 4]),
    registers=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125),
)
def test_any_read_reply_round_trips(unit: int, function: int, registers: list[int]) -> None:
    records = codec.decode(codec.read_reply(unit, function, registers))
    assert records[:2] == [("unit_id", "", unit), ("function", "", function)]
    assert [v for _n, _u, v in records[2:]] == registers


@given(body=st.binary(min_size=2, max_size=64))
def test_a_frame_with_its_crc_checks_to_zero_and_any_bit_flip_is_caught(body: bytes) -> None:
    frame = codec.with_crc(body)
    assert codec.crc16(frame) == 0
    flipped = bytes([frame[0] ^ 0x01]) + frame[1:]
    assert codec.crc16(flipped) != 0


@given(st.binary(max_size=64))
def test_crc_agrees_with_pymodbus(data: bytes) -> None:
    from pymodbus.framer.rtu import FramerRTU

    swapped = FramerRTU.compute_CRC(data)  # pymodbus returns it in wire order, high byte first
    assert codec.crc16(data) == ((swapped & 0xFF) << 8) | (swapped >> 8)


@given(
    unit=st.integers(1, 247),
    function=st.sampled_from([3, 4]),
    start=st.integers(0, 0xFF00),
    count=st.integers(1, 125),
)
def test_read_requests_match_what_pymodbus_sends(
    unit: int, function: int, start: int, count: int
) -> None:
    from pymodbus.framer.rtu import FramerRTU
    from pymodbus.pdu import DecodePDU
    from pymodbus.pdu.register_message import (
        ReadHoldingRegistersRequest,
        ReadInputRegistersRequest,
    )

    kind = ReadHoldingRegistersRequest if function == 3 else ReadInputRegistersRequest
    theirs = FramerRTU(DecodePDU(False)).buildFrame(kind(address=start, count=count, dev_id=unit))
    assert codec.read_request(unit, function, start, count) == theirs


@given(st.integers(0, 0xFFFFFFFF))
def test_float32_decoding_agrees_with_ieee754(bits: int) -> None:
    ours = codec.float32_from_bits(bits)
    theirs: float = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
    if math.isnan(theirs):
        assert math.isnan(ours)
    else:
        assert ours == theirs


@given(value=st.integers(0, 0xFFFFFFFF), order=st.sampled_from(codec.WORD_ORDERS))
def test_word_orders_round_trip(value: int, order: str) -> None:
    first, second = codec.split32(value, order)
    assert codec.combine32(first, second, order) == value


_params = st.fixed_dictionaries(
    {"profile": st.sampled_from(["sdm120", "sdm630", "senseair_s8", "urm13"])}
)


@given(data=st.binary(max_size=80), params=_params)
def test_profile_decoding_of_any_bytes_gives_readings_or_a_value_error(
    data: bytes, params: dict[str, str]
) -> None:
    try:
        decoded = FAMILY.decode(data, params)
    except ValueError as exc:
        reason = str(exc)
    else:
        assert all(isinstance(v, float) for _n, _u, v in decoded.records)
        return
    assert reason


# -- the planner ---------------------------------------------------------------------------


def _optimum(fields: list[tuple[int, int, int]], max_regs: int, gaps: dict[int, int],
             holes: list[tuple[int, int, int]]) -> int:  # fmt: skip
    """Fewest reads by dynamic programming over the sorted fields (an independent check)."""
    order = sorted(fields)
    best = [0] + [10**9] * len(order)
    for end in range(1, len(order) + 1):
        for begin in range(end - 1, -1, -1):
            group = order[begin:end]
            if _feasible(group, max_regs, gaps, holes):
                best[end] = min(best[end], best[begin] + 1)
    return best[-1]


def _feasible(group: list[tuple[int, int, int]], max_regs: int, gaps: dict[int, int],
              holes: list[tuple[int, int, int]]) -> bool:  # fmt: skip
    function = group[0][0]
    if any(f[0] != function for f in group):
        return False
    start, end = group[0][1], max(a + n for _f, a, n in group)
    reach = start
    for _f, address, count in group:
        if address - reach > gaps.get(function, 0):
            return False
        reach = max(reach, address + count)
    hole_hit = any(hf == function and a <= end - 1 and start <= b for hf, a, b in holes)
    return end - start <= max_regs and not hole_hit


_field = st.tuples(st.sampled_from([3, 4]), st.integers(0, 300), st.sampled_from([1, 2]))


@given(
    fields=st.lists(_field, min_size=1, max_size=14),
    max_regs=st.integers(2, 40),
    gap3=st.integers(0, 10),
    gap4=st.integers(0, 10),
    holes=st.lists(
        st.tuples(st.sampled_from([3, 4]), st.integers(0, 300), st.integers(0, 6)), max_size=3
    ),
)
def test_planner_covers_each_field_once_within_limits_with_fewest_reads(
    fields: list[tuple[int, int, int]], max_regs: int, gap3: int, gap4: int,
    holes: list[tuple[int, int, int]],
) -> None:  # fmt: skip
    hole_ranges = [(f, a, a + n) for f, a, n in holes]
    fields = [f for f in fields if not any(
        hf == f[0] and a <= f[1] + f[2] - 1 and f[1] <= b for hf, a, b in hole_ranges
    )]  # fmt: skip
    gaps = {3: gap3, 4: gap4}
    reads = codec.plan_reads(fields, max_regs, gaps, hole_ranges)
    covered = sorted(i for _f, _s, _n, indices in reads for i in indices)
    assert covered == list(range(len(fields)))  # every field exactly once
    for function, start, count, indices in reads:
        assert 1 <= count <= max_regs
        members = sorted(fields[i] for i in indices)
        assert all(f[0] == function for f in members)
        assert start == members[0][1]
        assert start + count == max(a + n for _f, a, n in members)
        assert _feasible(members, max_regs, gaps, hole_ranges)  # gaps within the limit, no hole
    assert len(reads) == _optimum(fields, max_regs, gaps, hole_ranges)


def test_planner_refuses_a_field_in_a_hole_or_larger_than_a_request() -> None:
    with pytest.raises(codec.PlanError, match="unreadable"):
        codec.plan_reads([(4, 5, 1)], 10, {}, [(4, 4, 20)])
    with pytest.raises(codec.PlanError, match="above the maximum"):
        codec.plan_reads([(4, 0, 2)], 1, {}, [])


def test_planner_does_not_fill_a_gap_across_a_hole() -> None:
    fields = [(4, 0, 1), (4, 3, 1), (4, 30, 1)]
    assert codec.plan_reads(fields, 40, {4: 40}, [(4, 10, 20)]) == [
        (4, 0, 4, [0, 1]),
        (4, 30, 1, [2]),
    ]
