"""The telemetry envelope: round trips, golden vectors, and refusal of every bad message.

Golden vectors live in tests/vectors/envelope_golden.json. To rebuild them after
a deliberate wire-format change run
``REGENERATE_GOLDEN=1 .venv/bin/pytest tests/test_envelope.py -k golden``
and review the diff; otherwise the test only compares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.envelope import (
    MAX_MESSAGE_BYTES,
    EncodingError,
    Record,
    Signer,
    TrustedKey,
    VerificationError,
    VerifiedMessage,
    encode_senml,
    open_sealed,
    seal,
    seq_of,
    signer_for,
)
from drivers.base import TIME_BEFORE, TIME_UNSYNCED, Reading

GOLDEN_PATH = Path(__file__).parent / "vectors" / "envelope_golden.json"
GW = "gw-0042"
TOPIC = f"citygate/{GW}/telemetry"
# RFC 8032 §7.1 test 1 secret key: public, fixed, fine for vectors.
GOLDEN_KEY_HEX = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
GOLDEN_READINGS = (
    Reading("bin-07", "distance", 1.234, "m", 1767225600.25),
    Reading("bin-07", "fill_level", 42.0, "%", 1767225600.25),
    Reading("aq-01", "temperature", 21.5, "Cel", 1767225601.5),
    Reading("aq-01", "pm2_5", 7.0, "ug/m3", 1767225601.5),
    Reading("bin-07", "distance", 1.2, "m", 1767225660.75),
    Reading("aq-01", "humidity", 48.25, "%RH", 1767225661.5),
)
GOLDEN_SEQ = 2**32 + 5  # needs more than 4 bytes on purpose
GOLDEN_IAT = 1767225700


def _kid_of(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:16]


def _trust(gateway_id: str, key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> TrustedKey:
    return TrustedKey(gateway_id, key.public_key())


def _seal(signer: Signer, senml: bytes, *, gateway_id: str = GW, topic: str = TOPIC) -> bytes:
    return seal(senml, signer=signer, gateway_id=gateway_id, seq=9, iat=1700000000, topic=topic)


def _hand_made(
    signer: Signer,
    protected: Mapping[int, Any],
    *,
    payload: bytes = b"\x80",
    tag: int = 18,
    unprotected: Mapping[int, Any] | None = None,
) -> bytes:
    """A correctly signed COSE_Sign1 with any protected header, built without agent.envelope."""
    protected_bstr = cbor2.dumps(dict(protected))
    to_sign = cbor2.dumps(["Signature1", protected_bstr, TOPIC.encode(), payload])
    body = [protected_bstr, dict(unprotected or {}), payload, signer.sign(to_sign)]
    return cbor2.dumps(cbor2.CBORTag(tag, body))


def _header(signer: Signer, **changes: Any) -> dict[int, Any]:
    claims: dict[int, Any] = {1: GW, 6: 1700000000, 7: (9).to_bytes(8, "big")}
    header: dict[int, Any] = {1: signer.alg, 3: 112, 4: signer.kid, 15: claims}
    for name, value in changes.items():
        target, label = {"alg": (header, 1), "cty": (header, 3), "seq": (claims, 7)}[name]
        if value is None:
            del target[label]
        else:
            target[label] = value
    return header


@pytest.fixture(scope="module")
def ed_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        _write_golden()
    if not GOLDEN_PATH.exists():
        pytest.fail(f"{GOLDEN_PATH} is missing: run with REGENERATE_GOLDEN=1 once")
    vector: dict[str, Any] = json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))
    return vector


def _write_golden() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(GOLDEN_KEY_HEX))
    signer = signer_for(key)
    senml = encode_senml(GW, GOLDEN_READINGS)
    message = seal(senml, signer=signer, gateway_id=GW, seq=GOLDEN_SEQ, iat=GOLDEN_IAT, topic=TOPIC)
    verified = open_sealed(message, TOPIC, {signer.kid: _trust(GW, key)})
    vector = {
        "description": "citygate telemetry envelope (DESIGN.md §3): Ed25519, SenML, COSE_Sign1",
        "private_key_ed25519_hex": GOLDEN_KEY_HEX,
        "kid_hex": signer.kid.hex(),
        "gateway_id": GW,
        "seq": GOLDEN_SEQ,
        "iat": GOLDEN_IAT,
        "topic": TOPIC,
        "readings": [
            {
                "sensor": r.sensor,
                "quantity": r.quantity,
                "value": r.value,
                "unit": r.unit,
                "time": r.time,
            }
            for r in GOLDEN_READINGS
        ],
        "records": [
            {"sensor": r.sensor, "n": r.n, "u": r.u, "v": r.v, "t": r.t} for r in verified.records
        ],
        "senml_hex": senml.hex(),
        "message_hex": message.hex(),
    }
    GOLDEN_PATH.write_text(json.dumps(vector, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _golden_inputs(vector: Mapping[str, Any]) -> tuple[Ed25519PrivateKey, list[Reading]]:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key_ed25519_hex"]))
    readings = [
        Reading(r["sensor"], r["quantity"], r["value"], r["unit"], r["time"])
        for r in vector["readings"]
    ]
    return key, readings


def _golden_trust(vector: Mapping[str, Any]) -> dict[bytes, TrustedKey]:
    key, _ = _golden_inputs(vector)
    return {bytes.fromhex(vector["kid_hex"]): _trust(vector["gateway_id"], key)}


# --- round trips ------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["ed_key", "p256_key"])
def test_sealed_message_opens_to_the_readings_grouped_by_sensor(
    key_name: str, request: pytest.FixtureRequest
) -> None:
    key = request.getfixturevalue(key_name)
    signer = signer_for(key)
    message = _seal(signer, encode_senml(GW, GOLDEN_READINGS))
    opened = open_sealed(message, TOPIC, {signer.kid: _trust(GW, key)})
    assert (opened.gateway_id, opened.seq, opened.iat, opened.kid) == (
        GW,
        9,
        1700000000,
        signer.kid,
    )
    by_sensor = sorted(GOLDEN_READINGS, key=lambda r: r.sensor != "bin-07")  # stable sort
    assert opened.records == tuple(
        Record(r.sensor, r.quantity, r.unit, r.value, r.time) for r in by_sensor
    )


def test_signer_reports_cose_alg_and_kid_of_the_spki() -> None:
    ed, p256 = Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    assert (signer_for(ed).alg, signer_for(ed).kid) == (-8, _kid_of(ed))
    assert (signer_for(p256).alg, signer_for(p256).kid) == (-7, _kid_of(p256))


def test_es256_signature_is_raw_r_and_s_not_der(p256_key: ec.EllipticCurvePrivateKey) -> None:
    signature = signer_for(p256_key).sign(b"data")
    assert len(signature) == 64
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    der = encode_dss_signature(r, s)
    p256_key.public_key().verify(der, b"data", ec.ECDSA(hashes.SHA256()))


def test_signer_refuses_other_curves() -> None:
    with pytest.raises(EncodingError, match="P-256"):
        signer_for(ec.generate_private_key(ec.SECP384R1()))


def test_encode_senml_is_deterministic_and_uses_integers_for_integral_values() -> None:
    first = encode_senml(GW, GOLDEN_READINGS)
    assert first == encode_senml(GW, list(GOLDEN_READINGS))
    pack = cbor2.loads(first)
    assert pack[1] == {0: "fill_level", 1: "%", 2: 42}
    assert type(pack[1][2]) is int
    assert pack[0][-2] == f"urn:dev:citygate:{GW}:bin-07:"
    assert pack[0][-3] == 1767225600.25
    assert 6 not in pack[0]
    assert pack[2][6] == 60.5


@pytest.mark.parametrize(
    ("gateway_id", "readings", "fragment"),
    [
        ("gw:1", GOLDEN_READINGS, "gateway id"),
        ("gw/1", GOLDEN_READINGS, "gateway id"),
        (GW, (), "at least one"),
        (GW, (Reading("a:b", "distance", 1.0, "m", 1.0),), "sensor id"),
        (GW, (Reading("s", "distance", math.nan, "m", 1.0),), "non-finite"),
        (GW, (Reading("s", "distance", 1.0, "m", math.inf),), "non-finite"),
    ],
)
def test_encode_senml_refuses_what_the_format_cannot_carry(
    gateway_id: str, readings: tuple[Reading, ...], fragment: str
) -> None:
    with pytest.raises(EncodingError, match=fragment):
        encode_senml(gateway_id, readings)


def test_seal_refuses_seq_beyond_eight_bytes(ed_key: Ed25519PrivateKey) -> None:
    with pytest.raises(EncodingError, match="seq"):
        seal(b"\x80", signer=signer_for(ed_key), gateway_id=GW, seq=2**64, iat=0, topic=TOPIC)


def test_verified_message_cannot_be_made_outside_open_sealed() -> None:
    with pytest.raises(TypeError, match="open_sealed"):
        VerifiedMessage(GW, 1, 2, b"k" * 16, ())


def test_seq_of_reads_the_unverified_seq(golden: dict[str, Any]) -> None:
    assert seq_of(bytes.fromhex(golden["message_hex"])) == GOLDEN_SEQ
    with pytest.raises(VerificationError):
        seq_of(b"\xd2\x80")


# --- golden vectors ---------------------------------------------------------


def test_golden_senml_and_message_bytes_are_reproduced(golden: dict[str, Any]) -> None:
    key, readings = _golden_inputs(golden)
    senml = encode_senml(golden["gateway_id"], readings)
    assert senml.hex() == golden["senml_hex"]
    message = seal(
        senml,
        signer=signer_for(key),
        gateway_id=golden["gateway_id"],
        seq=golden["seq"],
        iat=golden["iat"],
        topic=golden["topic"],
    )
    assert message.hex() == golden["message_hex"]


def test_golden_inputs_match_the_constants_in_this_file(golden: dict[str, Any]) -> None:
    key, readings = _golden_inputs(golden)
    assert (golden["private_key_ed25519_hex"], tuple(readings)) == (GOLDEN_KEY_HEX, GOLDEN_READINGS)
    assert (golden["gateway_id"], golden["seq"], golden["iat"]) == (GW, GOLDEN_SEQ, GOLDEN_IAT)
    assert golden["kid_hex"] == _kid_of(key).hex()


def test_golden_message_has_exactly_the_design_headers(golden: dict[str, Any]) -> None:
    item = cbor2.loads(bytes.fromhex(golden["message_hex"]))
    assert isinstance(item, cbor2.CBORTag)
    assert item.tag == 18
    protected, unprotected, payload, signature = item.value
    assert cbor2.loads(protected) == {
        1: -8,
        3: 112,
        4: bytes.fromhex(golden["kid_hex"]),
        15: {1: golden["gateway_id"], 6: golden["iat"], 7: golden["seq"].to_bytes(8, "big")},
    }
    assert dict(unprotected) == {}
    assert payload.hex() == golden["senml_hex"]
    assert len(signature) == 64


def test_golden_message_opens_to_the_recorded_records(golden: dict[str, Any]) -> None:
    opened = open_sealed(bytes.fromhex(golden["message_hex"]), TOPIC, _golden_trust(golden))
    assert [vars(r) for r in opened.records] == [
        {**r, "time_quality": ""} for r in golden["records"]
    ]
    assert (opened.seq, opened.iat) == (golden["seq"], golden["iat"])


def test_every_single_bit_flip_of_the_golden_message_is_refused(golden: dict[str, Any]) -> None:
    message = bytes.fromhex(golden["message_hex"])
    trusted = _golden_trust(golden)
    accepted = []
    for bit in range(len(message) * 8):
        flipped = bytearray(message)
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        try:
            open_sealed(bytes(flipped), TOPIC, trusted)
        except VerificationError:
            continue
        accepted.append(bit)
    assert accepted == []


# --- refusals ---------------------------------------------------------------


def test_message_replayed_on_another_gateways_topic_is_refused(
    ed_key: Ed25519PrivateKey, p256_key: ec.EllipticCurvePrivateKey
) -> None:
    signer = signer_for(ed_key)
    trusted = {signer.kid: _trust(GW, ed_key), signer_for(p256_key).kid: _trust("gw-9", p256_key)}
    message = _seal(signer, encode_senml(GW, GOLDEN_READINGS))
    with pytest.raises(VerificationError, match="topic"):
        open_sealed(message, "citygate/gw-9/telemetry", trusted)
    with pytest.raises(VerificationError, match="signature"):
        open_sealed(message, f"citygate/{GW}/events", trusted)


@pytest.mark.parametrize(
    "topic", ["other/gw-0042/telemetry", f"citygate/{GW}/", f"citygate/{GW}", f"citygate/{GW}/#"]
)
def test_topic_outside_the_gateways_tree_is_refused(ed_key: Ed25519PrivateKey, topic: str) -> None:
    signer = signer_for(ed_key)
    message = _seal(signer, encode_senml(GW, GOLDEN_READINGS), topic=topic)
    with pytest.raises(VerificationError, match="topic"):
        open_sealed(message, topic, {signer.kid: _trust(GW, ed_key)})


def test_custom_topic_prefix_is_honoured(ed_key: Ed25519PrivateKey) -> None:
    signer = signer_for(ed_key)
    topic = f"city/north/{GW}/telemetry"
    message = _seal(signer, encode_senml(GW, GOLDEN_READINGS), topic=topic)
    trusted = {signer.kid: _trust(GW, ed_key)}
    assert open_sealed(message, topic, trusted, prefix="city/north").seq == 9
    with pytest.raises(VerificationError, match="topic"):
        open_sealed(message, topic, trusted)


def test_unknown_kid_is_refused(ed_key: Ed25519PrivateKey) -> None:
    message = _seal(signer_for(ed_key), encode_senml(GW, GOLDEN_READINGS))
    other = Ed25519PrivateKey.generate()
    with pytest.raises(VerificationError, match="not trusted"):
        open_sealed(message, TOPIC, {signer_for(other).kid: _trust(GW, other)})


def test_kid_filed_under_the_wrong_key_is_refused(ed_key: Ed25519PrivateKey) -> None:
    signer = signer_for(ed_key)
    message = _seal(signer, encode_senml(GW, GOLDEN_READINGS))
    with pytest.raises(VerificationError, match="differs"):
        open_sealed(message, TOPIC, {signer.kid: _trust(GW, Ed25519PrivateKey.generate())})


def test_claimed_gateway_must_own_the_key(ed_key: Ed25519PrivateKey) -> None:
    signer = signer_for(ed_key)
    message = _seal(signer, encode_senml("gw-other", GOLDEN_READINGS), gateway_id="gw-other")
    with pytest.raises(VerificationError, match="belongs to"):
        open_sealed(message, "citygate/gw-other/telemetry", {signer.kid: _trust(GW, ed_key)})


@pytest.mark.parametrize(("key_name", "wrong_alg"), [("ed_key", -7), ("p256_key", -8)])
def test_alg_that_does_not_suit_the_key_is_refused(
    key_name: str, wrong_alg: int, request: pytest.FixtureRequest
) -> None:
    key = request.getfixturevalue(key_name)
    signer = signer_for(key)
    message = _hand_made(signer, _header(signer, alg=wrong_alg))
    with pytest.raises(VerificationError, match="alg"):
        open_sealed(message, TOPIC, {signer.kid: _trust(GW, key)})


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"seq": (9).to_bytes(4, "big")}, "seq must be 8 bytes, got 4"),
        ({"seq": 9}, "label 7 must be bytes"),
        ({"seq": None}, "label 7 is missing"),
        ({"alg": -35}, "alg must be"),
        ({"alg": None}, "label 1 is missing"),
        ({"cty": 50}, "content type"),
        ({"cty": None}, "label 3 is missing"),
    ],
)
def test_protected_header_fields_must_be_present_and_typed(
    ed_key: Ed25519PrivateKey, changes: dict[str, Any], fragment: str
) -> None:
    signer = signer_for(ed_key)
    message = _hand_made(signer, _header(signer, **changes))
    with pytest.raises(VerificationError, match=fragment):
        open_sealed(message, TOPIC, {signer.kid: _trust(GW, ed_key)})


def test_unexpected_protected_label_and_unprotected_content_are_refused(
    ed_key: Ed25519PrivateKey,
) -> None:
    signer = signer_for(ed_key)
    trusted = {signer.kid: _trust(GW, ed_key)}
    with pytest.raises(VerificationError, match="unexpected label 2"):
        open_sealed(_hand_made(signer, {**_header(signer), 2: [99]}), TOPIC, trusted)
    with pytest.raises(VerificationError, match="unprotected"):
        open_sealed(_hand_made(signer, _header(signer), unprotected={4: b"x"}), TOPIC, trusted)


@pytest.mark.parametrize(
    "message",
    [
        cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])),
        cbor2.dumps([b"", {}, b"", b""]),
        cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])),
        cbor2.dumps(cbor2.CBORTag(18, [{}, {}, b"", b""])),
        b"",
    ],
)
def test_not_a_tagged_cose_sign1_is_refused(message: bytes) -> None:
    with pytest.raises(VerificationError, match="message"):
        open_sealed(message, TOPIC, {})


def test_trailing_bytes_after_the_message_are_refused(golden: dict[str, Any]) -> None:
    message = bytes.fromhex(golden["message_hex"]) + b"\x00"
    with pytest.raises(VerificationError, match="after the CBOR item"):
        open_sealed(message, TOPIC, _golden_trust(golden))


def test_oversize_message_is_refused_before_decoding(ed_key: Ed25519PrivateKey) -> None:
    with pytest.raises(VerificationError, match="exceeds"):
        open_sealed(b"\x00" * (MAX_MESSAGE_BYTES + 1), TOPIC, {})
    signer = signer_for(ed_key)
    many = [Reading("s", "distance", i + 0.1, "m", 1.7e9 + i) for i in range(30000)]
    message = _seal(signer, encode_senml(GW, many))
    assert len(message) > MAX_MESSAGE_BYTES
    with pytest.raises(VerificationError, match="exceeds"):
        open_sealed(message, TOPIC, {signer.kid: _trust(GW, ed_key)})


@pytest.mark.parametrize(
    ("pack", "fragment"),
    [
        ([], "non-empty array"),
        ({}, "non-empty array"),
        ([{0: "distance", 1: "m", 2: 1}], "no base name"),
        ([{-2: "urn:dev:citygate:gw-9:s:", 0: "distance", 2: 1}], "names gateway"),
        ([{-2: f"urn:dev:other:{GW}:s:", 0: "distance", 2: 1}], "base name must be"),
        ([{-2: f"urn:dev:citygate:{GW}:s", 0: "distance", 2: 1}], "base name must be"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 2: 1, 3: "x"}], "exactly one"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance"}], "exactly one"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 5: 1}], "sum"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 2: math.inf}], "finite"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 2: True}], "number"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 2: 1, 6: "x"}], "number"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 2: 1, 99: 1}], "label 99"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 0: "distance", 2: 2**1100}], "out of range"),
        ([{-2: f"urn:dev:citygate:{GW}:s:", 2: 1}], "label 0 is missing"),
    ],
)
def test_signed_but_malformed_senml_is_refused(
    ed_key: Ed25519PrivateKey, pack: object, fragment: str
) -> None:
    signer = signer_for(ed_key)
    message = _seal(signer, cbor2.dumps(pack))
    with pytest.raises(VerificationError, match=fragment):
        open_sealed(message, TOPIC, {signer.kid: _trust(GW, ed_key)})


def test_senml_base_values_carry_over_until_changed(ed_key: Ed25519PrivateKey) -> None:
    base = f"urn:dev:citygate:{GW}:"
    pack = [
        {-2: base + "a:", -3: 100, -4: "m", 0: "distance", 2: 1.5},
        {0: "distance", 2: 2, 6: 10},
        {0: "flag", 4: True, 1: "/"},
        {-2: base + "b:", 0: "label", 3: "ok"},
        {-3: 200.5, 0: "pm10", 1: "ug/m3", 2: 3},
    ]
    signer = signer_for(ed_key)
    opened = open_sealed(_seal(signer, cbor2.dumps(pack)), TOPIC, {signer.kid: _trust(GW, ed_key)})
    assert opened.records == (
        Record("a", "distance", "m", 1.5, 100.0),
        Record("a", "distance", "m", 2.0, 110.0),
        Record("a", "flag", "/", True, 100.0),
        Record("b", "label", "m", "ok", 100.0),
        Record("b", "pm10", "ug/m3", 3.0, 200.5),
    )


# --- time quality -----------------------------------------------------------


def test_reading_from_before_a_boot_carries_the_must_understand_flag(
    ed_key: Ed25519PrivateKey,
) -> None:
    readings = [
        Reading("aq-01", "pm2_5", 7.0, "ug/m3", 1767225601.5, TIME_BEFORE),
        Reading("aq-01", "pm10", 9.0, "ug/m3", 1767225661.5),
    ]
    senml = encode_senml(GW, readings)
    pack = cbor2.loads(senml)
    assert pack[0]["tq_"] == "before"
    assert all(type(label) is int for label in pack[1])  # a synced record: as before the flag
    signer = signer_for(ed_key)
    opened = open_sealed(_seal(signer, senml), TOPIC, {signer.kid: _trust(GW, ed_key)})
    assert opened.records == (
        Record("aq-01", "pm2_5", "ug/m3", 7.0, 1767225601.5, "before"),
        Record("aq-01", "pm10", "ug/m3", 9.0, 1767225661.5),
    )


@pytest.mark.parametrize(
    ("quality", "fragment"), [(TIME_UNSYNCED, "boot-relative"), (7, "unknown")]
)
def test_a_boot_relative_or_unknown_time_is_never_encoded(quality: int, fragment: str) -> None:
    readings = [*GOLDEN_READINGS, Reading("aq-01", "pm2_5", 7.0, "ug/m3", 12.5, quality)]
    with pytest.raises(EncodingError, match=fragment):
        encode_senml(GW, readings)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"tq_": "after"}, "tq_ must be 'before'"),
        ({"tq_": 2}, "tq_ must be 'before'"),
        ({"rt_": 1}, "'rt_' must be understood"),
        ({"tq": "before"}, "unexpected label"),
        ({b"tq_": "before"}, "unexpected label"),
    ],
)
def test_unknown_must_understand_labels_and_bad_flags_are_refused(
    ed_key: Ed25519PrivateKey, extra: dict[object, object], fragment: str
) -> None:
    record = {-2: f"urn:dev:citygate:{GW}:s:", -3: 1767225600, 0: "distance", 1: "m", 2: 1}
    signer = signer_for(ed_key)
    message = _seal(signer, cbor2.dumps([{**record, **extra}]))
    with pytest.raises(VerificationError, match=fragment):
        open_sealed(message, TOPIC, {signer.kid: _trust(GW, ed_key)})


# --- properties -------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600) | st.binary(max_size=300).map(lambda b: b"\xd2\x84" + b))
def test_arbitrary_bytes_raise_only_verification_error(data: bytes) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(GOLDEN_KEY_HEX))
    trusted = {_kid_of(key): _trust(GW, key)}
    with pytest.raises(VerificationError):
        open_sealed(data, TOPIC, trusted)
    with contextlib.suppress(VerificationError):
        seq_of(data)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.binary(max_size=20)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-5, 20), inner, max_size=4)
        | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 18, 24, 28, 30, 37, 55799]), inner)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(protected=_cbor_values, parts=st.lists(_cbor_values, max_size=5))
def test_arbitrary_cbor_structures_raise_only_verification_error(
    protected: object, parts: list[object]
) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(GOLDEN_KEY_HEX))
    try:
        protected_bstr = cbor2.dumps(protected)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        protected_bstr = b"\xa0"
    message = cbor2.dumps(cbor2.CBORTag(18, [protected_bstr, *parts]), default=None)
    with pytest.raises(VerificationError):
        open_sealed(message, TOPIC, {_kid_of(key): _trust(GW, key)})


_readings = st.lists(
    st.builds(
        Reading,
        sensor=st.sampled_from(["bin-01", "aq-02", "meter-3"]),
        quantity=st.sampled_from(["distance", "temperature", "energy_import"]),
        value=st.floats(allow_nan=False, allow_infinity=False)
        | st.integers(-(2**53) + 1, 2**53 - 1).map(float),
        unit=st.sampled_from(["m", "Cel", "J"]),
        # within a factor of two of each other, so time - base time is exact
        time=st.floats(min_value=1.5e9, max_value=2.9e9),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(readings=_readings)
def test_arbitrary_readings_round_trip(readings: list[Reading]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(GOLDEN_KEY_HEX))
    signer = signer_for(key)
    opened = open_sealed(
        _seal(signer, encode_senml(GW, readings)), TOPIC, {signer.kid: _trust(GW, key)}
    )
    sensors = list(dict.fromkeys(r.sensor for r in readings))
    expected = sorted(readings, key=lambda r: sensors.index(r.sensor))
    assert opened.records == tuple(
        Record(r.sensor, r.quantity, r.unit, r.value, r.time) for r in expected
    )
