"""BTHome v2 codec and encryption: vectors, every object id, round trips, tampering, any bytes."""

from __future__ import annotations

import ast
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.bthome import FAMILY, codec, crypto
from drivers.bthome.codec import BTHomeEncrypted, BTHomeError
from drivers.bthome.crypto import BTHomeBadMic
from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors" / "bthome_v2.json"
PACKAGE = Path(codec.__file__).parent
# vector object names -> our quantity names
FIELD_TO_QUANTITY = {
    "temperature_c": "temperature",
    "humidity_pct": "humidity",
    "count_u16": "count",
    "count_u32": "count",
}

# SENSORS.md 4.3 / bthome-ble tests: the right key for the encrypted examples
KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
MAC = "54:48:E6:8F:80:A5"
ENCRYPTED_CLIMATE = bytes.fromhex("41 A472 66C9 5F73 00112233 78237214")
ENCRYPTED_MOTION = bytes.fromhex("41 87B9 00112233 72B0231F")


def _vectors() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _service_data(vector: dict[str, Any]) -> bytes:
    raw = bytes.fromhex(vector["hex"])
    return codec.from_advertisement(raw) if vector["kind"] == "adv" else raw


def _check_expectations(vector: dict[str, Any], data: bytes) -> None:
    expect = vector["expect"]
    for field, expected in expect.items():
        if field == "objects":
            wanted = [(FIELD_TO_QUANTITY[name], value) for name, value in expected]
            records = codec.decode(data)
            assert [quantity for quantity, _u, _v in records] == [q for q, _v in wanted]
            assert [value for _q, _u, value in records] == pytest.approx([v for _q, v in wanted])
        elif field == "device_info":
            assert codec.is_encrypted(data) is expected["encrypted"]
            assert codec.is_trigger_based(data) is expected["trigger_based"]
            assert data[0] >> 5 == expected["version"]
        elif field == "local_name":  # the name AD is not ours to decode; it is in the advert
            assert expected.encode() in bytes.fromhex(vector["hex"])
        else:
            pytest.fail(f"vector field {field!r} is not mapped")


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_decodes_as_documented(vector: dict[str, Any]) -> None:
    data = _service_data(vector)
    if vector["kind"] == "service_data_encrypted":
        with pytest.raises(BTHomeEncrypted, match="key"):
            codec.decode(data)
        key, mac = bytes.fromhex(vector["key"]), vector["mac"]
        if vector.get("expect_error"):
            with pytest.raises(BTHomeError, match=r"\S"):
                codec.decode(crypto.decrypt(data, mac, key))
            return
        data = crypto.decrypt(data, mac, key)
    assert not vector.get("expect_error"), "a plaintext error vector needs a check here"
    _check_expectations(vector, data)


@pytest.mark.parametrize(
    ("hex_objects", "quantity", "unit", "value"),
    [
        ("0009", None, None, None),  # packet id: no record
        ("015D", "battery", "%", 93),
        ("02CA09", "temperature", "Cel", 25.06),
        ("03BF13", "humidity", "%RH", 50.55),
        ("04138A01", "pressure", "Pa", 100883),  # 1008.83 hPa
        ("05138A14", "illuminance", "lx", 13460.67),
        ("0960", "count", "/", 96),
        ("0A138A14", "energy", "J", 1346.067 * 3.6e6),  # kWh
        ("0B021B00", "power", "W", 69.14),
        ("0C020C", "voltage", "V", 3.074),
        ("0D120C", "pm2_5", "ug/m3", 3090),
        ("0E120C", "pm10", "ug/m3", 3090),
        ("12E204", "co2", "ppm", 1250),
        ("2101", "motion", "/", 1),
        ("3A04", "button", "/", 4),
        ("3D0960", "count", "/", 24585),
        ("3E2A2C0960", "count", "/", 1611213866),
        ("400C00", "distance", "m", 0.012),  # 12 mm
        ("414E00", "distance", "m", 7.8),
        ("451101", "temperature", "Cel", 27.3),
    ],
)
def test_object_table_examples_decode_to_our_names_and_units(
    hex_objects: str, quantity: str | None, unit: str | None, value: float | None
) -> None:
    records = codec.decode(bytes.fromhex("40" + hex_objects))
    if quantity is None:
        assert records == []
    else:
        [(got_quantity, got_unit, got_value)] = records
        assert (got_quantity, got_unit) == (quantity, unit)
        assert got_value == pytest.approx(value)


def test_several_objects_in_one_packet_keep_their_order_and_repeats() -> None:
    data = bytes.fromhex("40 0009 015D 02CA09 02CB09 03BF13")
    assert codec.decode(data) == [
        ("battery", "%", 93.0),
        ("temperature", "Cel", 25.06),
        ("temperature", "Cel", 25.07),
        ("humidity", "%RH", 50.55),
    ]
    assert codec.packet_id(data) == 9
    assert codec.packet_id(bytes.fromhex("4002CA09")) is None


def test_signed_values_and_dimmer_directions() -> None:
    assert codec.decode(bytes.fromhex("4002F6FF"))[0][2] == pytest.approx(-0.1)
    assert codec.decode(bytes.fromhex("405BFFFFFFFF"))[0][2] == -1
    assert [v for _q, _u, v in codec.decode(bytes.fromhex("40 3C0203 3C0105 3C0000"))] == [3, -5, 0]
    assert codec.decode(bytes.fromhex("403C0707")) == []  # unknown dimmer event: no value


def test_text_and_raw_objects_are_skipped_not_published() -> None:
    data = bytes.fromhex("40 5303414243 5402FFEE 015D")
    assert codec.decode(data) == [("battery", "%", 93.0)]


def test_mac_included_flag_skips_the_reversed_mac() -> None:
    data = bytes.fromhex("42 A5808FE64854 015D")
    assert codec.mac_of(data) == MAC
    assert codec.decode(data) == [("battery", "%", 93.0)]
    assert codec.mac_of(bytes.fromhex("40015D")) is None


@pytest.mark.parametrize(
    ("data", "error", "reason"),
    [
        ("", BTHomeError, "empty service data"),
        ("20015D", BTHomeError, "BTHome version 1 in device info 0x20, expected 2"),
        ("41015D", BTHomeEncrypted, "a key .* is needed"),
        ("40015D FF01", BTHomeError, "unknown object id 0xff at offset 3"),
        ("40 02CA", BTHomeError, "object 0x02 at offset 1 needs 2 bytes, 1 left"),
        ("40 53", BTHomeError, "lacks its length"),
        ("40 5305AB", BTHomeError, "needs 5 bytes, 1 left"),
        ("42 A5808F", BTHomeError, "MAC is included but only 4 bytes"),
    ],
)
def test_bad_packets_are_rejected_with_a_precise_reason(
    data: str, error: type[BTHomeError], reason: str
) -> None:
    for function in (codec.decode, codec.packet_id):
        with pytest.raises(error, match=reason):
            function(bytes.fromhex(data))


def test_error_types_form_one_value_error_hierarchy() -> None:
    assert issubclass(BTHomeError, ValueError)
    assert issubclass(BTHomeEncrypted, BTHomeError)
    assert issubclass(BTHomeBadMic, BTHomeError)


def test_service_data_is_found_in_a_whole_advertisement() -> None:
    adv = bytes.fromhex("020106 0B094449592D73656E736F72 0A16D2FC4002C40903BF13")
    assert codec.from_advertisement(adv) == bytes.fromhex("4002C40903BF13")
    with pytest.raises(BTHomeError, match="no service data for UUID 0xFCD2"):
        codec.from_advertisement(bytes.fromhex("020106 05161C18AABB"))


# -- encoder -----------------------------------------------------------------------------


def test_encoder_builds_the_official_example() -> None:
    data = codec.encode([(0x03, 50.55), (0x02, 25.0)])  # written in ascending id order
    assert data == bytes.fromhex("4002C40903BF13")
    assert codec.encode([(0x01, 93)], packet_id=9, trigger=True) == bytes.fromhex("440009015D")


@pytest.mark.parametrize(
    ("objects", "reason"),
    [
        ([(0xFF, 1.0)], "unknown object id 0xff"),
        ([(0x53, 1.0)], "carries no measurement"),
        ([(0x00, 1.0)], "carries no measurement"),
        ([(0x01, 256.0)], "does not fit object 0x01"),
        ([(0x02, -400.0)], "does not fit object 0x02"),
        ([(0x02, math.nan)], "cannot be encoded"),
        ([(0x3C, 300.0)], "dimmer steps 300"),
    ],
)
def test_encoder_rejects_what_it_cannot_send(objects: list[tuple[int, float]], reason: str) -> None:
    with pytest.raises(BTHomeError, match=reason):
        codec.encode(objects)
    with pytest.raises(BTHomeError, match="packet id 256"):
        codec.encode([], packet_id=256)


BINARY_IDS = {*range(0x0F, 0x12), *range(0x15, 0x2E)}  # on/off states


def _raw_for(object_id: int) -> st.SearchStrategy[bytes]:
    """Value bytes the encoder reproduces exactly for `object_id` (binary 0/1, known dimmers)."""
    size = codec.object_info(object_id)[2]
    if object_id == codec.OBJ_DIMMER:
        return st.one_of(
            st.just(b"\x00\x00"),
            st.tuples(st.sampled_from([1, 2]), st.integers(1, 255)).map(bytes),
        )
    if object_id in BINARY_IDS:
        return st.sampled_from([b"\x00", b"\x01"])
    return st.binary(min_size=size, max_size=size)


MEASUREMENT_IDS = [i for i in codec.object_ids() if i not in (0x00, codec.OBJ_TEXT, codec.OBJ_RAW)]
objects_strategy = st.lists(
    st.sampled_from(MEASUREMENT_IDS).flatmap(lambda i: _raw_for(i).map(lambda raw: (i, raw))),
    max_size=12,
)


@given(objects=objects_strategy, pid=st.none() | st.integers(0, 255), trigger=st.booleans())
def test_any_packet_of_known_objects_is_re_encoded_byte_for_byte(
    objects: list[tuple[int, bytes]], pid: int | None, trigger: bool
) -> None:
    objects = sorted(objects, key=lambda item: item[0])  # stable: repeats keep their order
    wire = bytearray([0x44 if trigger else 0x40])
    if pid is not None:
        wire += bytes([0, pid])
    for object_id, raw in objects:
        wire += bytes([object_id]) + raw
    records = codec.decode(bytes(wire))
    assert len(records) == len(objects)
    assert [(q, u) for q, u, _v in records] == [codec.object_info(i)[:2] for i, _r in objects]
    pairs = [
        (object_id, value)
        for (object_id, _raw), (_q, _u, value) in zip(objects, records, strict=True)
    ]
    assert codec.encode(pairs, packet_id=pid, trigger=trigger) == bytes(wire)
    assert codec.packet_id(bytes(wire)) == pid


def test_every_known_object_id_round_trips_a_typical_value() -> None:
    for object_id in MEASUREMENT_IDS:
        quantity, _unit, size, signed = codec.object_info(object_id)
        raw = (-3 if signed else 3) & ((1 << (8 * size)) - 1)
        if object_id == codec.OBJ_DIMMER:
            raw = 0x0302
        elif object_id in BINARY_IDS:
            raw = 1
        wire = bytes([0x40, object_id]) + raw.to_bytes(size, "little")
        value = codec.decode(wire)[0][2]
        assert codec.encode([(object_id, value)]) == wire, quantity


# -- encryption --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sealed", "plain", "records"),
    [
        (
            ENCRYPTED_CLIMATE,
            "4002CA0903BF13",
            [("temperature", "Cel", 25.06), ("humidity", "%RH", 50.55)],
        ),
        (ENCRYPTED_MOTION, "402101", [("motion", "/", 1.0)]),
    ],
)
def test_encrypted_examples_decrypt_and_re_encrypt_identically(
    sealed: bytes, plain: str, records: list[tuple[str, str, float]]
) -> None:
    assert crypto.counter_of(sealed) == 0x33221100
    decrypted = crypto.decrypt(sealed, MAC, KEY)
    assert decrypted == bytes.fromhex(plain)
    assert codec.decode(decrypted) == records
    assert crypto.encrypt(decrypted, MAC, KEY, 0x33221100) == sealed
    assert crypto.encrypt(decrypted, MAC.lower().replace(":", "-"), KEY, 0x33221100) == sealed


def test_every_flipped_bit_of_an_encrypted_packet_is_rejected() -> None:
    for bit in range(8 * len(ENCRYPTED_CLIMATE)):
        tampered = bytearray(ENCRYPTED_CLIMATE)
        tampered[bit // 8] ^= 1 << (bit % 8)
        if bit == 0:  # the encryption flag itself: no longer an encrypted packet
            with pytest.raises(BTHomeError, match="does not say"):
                crypto.decrypt(bytes(tampered), MAC, KEY)
            continue
        # any other info bit changes the nonce; any later bit the ciphertext, counter or MIC
        with pytest.raises(BTHomeBadMic):
            crypto.decrypt(bytes(tampered), MAC, KEY)


def test_wrong_key_or_wrong_mac_fails_the_mic() -> None:
    with pytest.raises(BTHomeBadMic, match="MIC check failed"):
        crypto.decrypt(ENCRYPTED_CLIMATE, MAC, KEY[:-1] + b"\x33")
    with pytest.raises(BTHomeBadMic):
        crypto.decrypt(ENCRYPTED_CLIMATE, "54:48:E6:8F:80:A6", KEY)


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: crypto.decrypt(bytes.fromhex("4002CA09"), MAC, KEY), "does not say .* encrypted"),
        (lambda: crypto.decrypt(bytes.fromhex("41001122"), MAC, KEY), "too short"),
        (lambda: crypto.decrypt(ENCRYPTED_CLIMATE, MAC, KEY[:8]), "key has 8 bytes"),
        (lambda: crypto.decrypt(ENCRYPTED_CLIMATE, "54:48", KEY), "does not have 6 bytes"),
        (lambda: crypto.decrypt(ENCRYPTED_CLIMATE, "ZZ" * 6, KEY), "not hexadecimal"),
        (lambda: crypto.encrypt(b"", MAC, KEY, 1), "empty"),
        (lambda: crypto.encrypt(b"\x40", MAC, KEY, -1), "counter -1"),
        (lambda: crypto.parse_key("abc"), "not hexadecimal"),
        (lambda: crypto.parse_key("00" * 15), "key has 15 bytes"),
    ],
)
def test_crypto_rejects_bad_input_with_a_reason(call: Any, reason: str) -> None:
    with pytest.raises(BTHomeError, match=reason):
        call()


def test_parse_key_accepts_the_config_form() -> None:
    assert crypto.parse_key("231d39c1d7cc1ab1aee224cd096db932\n") == KEY


@given(
    objects=objects_strategy,
    counter=st.integers(0, 0xFFFFFFFF),
    key=st.binary(min_size=16, max_size=16),
    mac_included=st.booleans(),
)
def test_encrypt_then_decrypt_gives_the_plaintext_back(
    objects: list[tuple[int, bytes]], counter: int, key: bytes, mac_included: bool
) -> None:
    plain = b"\x40" + b"".join(bytes([i]) + raw for i, raw in objects)
    if mac_included:
        plain = b"\x42" + bytes.fromhex("A5808FE64854") + plain[1:]
    sealed = crypto.encrypt(plain, MAC, key, counter)
    assert codec.is_encrypted(sealed)
    assert len(sealed) == len(plain) + 8
    assert crypto.counter_of(sealed) == counter
    # with the MAC in the packet, the nonce uses it and the mac argument does not matter
    mac = "00:00:00:00:00:00" if mac_included else MAC
    assert crypto.decrypt(sealed, mac, key) == plain


# -- arbitrary bytes ---------------------------------------------------------------------

bthome_like = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda b: b"\x40" + b),
    st.binary(max_size=40).map(lambda b: b"\x42" + b),
)


@given(data=bthome_like)
def test_any_bytes_give_records_or_a_bthome_error(data: bytes) -> None:
    try:
        records = codec.decode(data)
    except BTHomeError:
        return
    assert all(isinstance(v, float) and math.isfinite(v) for _q, _u, v in records)
    codec.packet_id(data)
    codec.mac_of(data)


@given(data=st.binary(max_size=40).map(lambda b: b"\x41" + b) | st.binary(max_size=40))
def test_any_bytes_decrypt_or_raise_a_bthome_error(data: bytes) -> None:
    try:
        plain = crypto.decrypt(data, MAC, KEY)
    except BTHomeError:
        return
    assert not codec.is_encrypted(plain)  # pragma: no cover - a forged MIC is 1 in 2**32


@given(adv=st.binary(max_size=64))
def test_any_advertisement_gives_service_data_or_a_bthome_error(adv: bytes) -> None:
    try:
        payload = codec.from_advertisement(adv)
    except BTHomeError:
        return
    assert b"\x16\xd2\xfc" + payload in adv


# -- the codec file and its documentation -----------------------------------------------


def test_codec_imports_nothing_so_it_runs_on_micropython() -> None:
    tree = ast.parse((PACKAGE / "codec.py").read_text())
    assert [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)] == []


def test_readme_lists_every_object_id_with_its_quantity_and_unit() -> None:
    rows = re.findall(
        r"^\| `0x([0-9A-F]{2})` \| `([a-z0-9_]+)` \| `([^`]*)` \|",
        (PACKAGE / "README.md").read_text(),
        flags=re.MULTILINE,
    )
    documented = {int(i, 16): (quantity, unit) for i, quantity, unit in rows}
    assert documented == {i: codec.object_info(i)[:2] for i in codec.object_ids()}


# -- through the family and the command line ----------------------------------------------


def _cli(*args: str) -> list[dict[str, Any]]:
    result = citygate("decode", "bthome", *args)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines, result.stderr
    return lines


def test_every_vector_decodes_as_documented_through_the_command_line() -> None:
    plain = [v for v in _vectors() if v["kind"] != "service_data_encrypted"]
    for vector, got in zip(plain, _cli(*[v["hex"] for v in plain]), strict=True):
        assert got["ok"] is True, vector["id"]
        wanted = [(FIELD_TO_QUANTITY[n], v) for n, v in vector["expect"]["objects"]]
        assert [(r["n"], r["v"]) for r in got["records"]] == wanted, vector["id"]
    for vector in (v for v in _vectors() if v["kind"] == "service_data_encrypted"):
        [got] = _cli("--mac", vector["mac"], "--key", vector["key"], vector["hex"])
        assert vector.get("expect_error"), vector["id"]
        assert got["ok"] is False, vector["id"]
        assert "MIC" in got["error"], vector["id"]


def test_command_line_decrypts_with_mac_and_key_and_asks_for_them_otherwise() -> None:
    sealed = [ENCRYPTED_CLIMATE.hex(), ENCRYPTED_MOTION.hex()]
    climate, motion = _cli("--mac", MAC, "--key", KEY.hex(), *sealed)
    assert [(r["n"], r["u"], r["v"]) for r in climate["records"]] == [
        ("temperature", "Cel", 25.06),
        ("humidity", "%RH", 50.55),
    ]
    assert motion["records"] == [{"n": "motion", "u": "/", "v": 1.0}]
    [without_key] = _cli(sealed[0])
    assert without_key["ok"] is False
    assert "--key" in without_key["error"]


def test_sample_config_is_accepted_by_the_family() -> None:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        sensors: dict[str, Any] = tomllib.load(fh)["sensors"]
    [(sensor_id, table)] = sensors.items()
    assert table["driver"] == FAMILY.name == "bthome"
    FAMILY.parse_options(sensor_id, table)


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


def test_family_decodes_a_packet_like_the_codec() -> None:
    data = bytes.fromhex("4002C40903BF13")
    assert FAMILY.decode(data, {}).records == codec.decode(data)
