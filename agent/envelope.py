"""The telemetry envelope: SenML CBOR inside a tagged COSE_Sign1 (DESIGN.md §3).

Pure functions of values, no I/O. The sending side turns readings into a SenML
pack (`encode_senml`) and signs it for one topic (`seal`); the receiving side
checks a message against trusted keys and the topic it arrived on
(`open_sealed`) and only then hands out its contents as a `VerifiedMessage`.

Time quality (agent.clock): a reading whose time is from before a boot whose
clock was never set (TIME_BEFORE) carries the SenML extension label "tq_" with
the value "before": its time is an upper bound. The trailing underscore makes
the label must-understand (RFC 8428 §4.4), so a consumer that does not know it
rejects the pack rather than take the bound for the time. A reading with a
boot-relative time (TIME_UNSYNCED) is never encoded. Records of readings with
a synced time are exactly as before the label existed.

Trust: the sending side trusts its arguments (they come from our own pipeline)
but refuses values the wire format cannot carry. The receiving side trusts
nothing in the message bytes; it trusts only the `TrustedKey` mapping and the
topic given by its caller (the broker's ACL vouches for the topic). Every
failure there is a `VerificationError`: library exceptions are translated
once, where hostile bytes meet cbor2 and `cryptography`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.keys import KID_BYTES, PrivateKey, PublicKey, kid_for
from drivers.base import TIME_BEFORE, TIME_SYNCED, TIME_UNSYNCED, Reading

MAX_MESSAGE_BYTES: Final = 256 * 1024
ALG_EDDSA: Final = -8
ALG_ES256: Final = -7
CONTENT_TYPE_SENML_CBOR: Final = 112
COSE_SIGN1_TAG: Final = 18
SEQ_BYTES: Final = 8

# COSE header labels (RFC 9052 §3.1) and CWT claim keys (RFC 8392 §4) we use.
_H_ALG, _H_CTY, _H_KID, _H_CWT = 1, 3, 4, 15
_C_ISS, _C_IAT, _C_SEQ = 1, 6, 7
# SenML labels (RFC 8428 §6).
_BVER, _BN, _BT, _BU, _N, _U, _V, _VS, _VB, _S, _T = -1, -2, -3, -4, 0, 1, 2, 3, 4, 5, 6
_RECORD_LABELS: Final = frozenset({_BVER, _BN, _BT, _BU, _N, _U, _V, _VS, _VB, _S, _T})
# Our SenML extension (text label, must-understand): the time is an upper bound.
_TQ: Final = "tq_"
TQ_BEFORE: Final = "before"
_URN_PREFIX: Final = "urn:dev:citygate:"
_SAFE_INT: Final = 2**53  # integral values below this travel as CBOR integers
_MAX_DEPTH: Final = 8
_NAME: Final = re.compile(r"[A-Za-z0-9._-]+")  # status subjects, record names, event kinds

#: a value of a status record (health, events): a number, a text or a yes/no
Value = float | str | bool
#: one status record: (name, unit, value); an empty unit is left out
StatusRecord = tuple[str, str, Value]


class EnvelopeError(Exception):
    """Base of the envelope's errors."""


class EncodingError(EnvelopeError, ValueError):
    """The sending side was asked for something the wire format cannot carry."""


class VerificationError(EnvelopeError):
    """A received message is malformed, untrusted or not signed for its topic."""


# --- sending side -----------------------------------------------------------


class Signer:
    """Signs with a gateway identity key; make one with `signer_for`."""

    __slots__ = ("_key", "alg", "kid")

    def __init__(self, key: PrivateKey, alg: int, kid: bytes) -> None:
        self._key = key
        self.alg = alg
        self.kid = kid

    def sign(self, data: bytes) -> bytes:
        """The COSE signature of `data`: 64 bytes (Ed25519, or raw r||s for ES256)."""
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(data)
        der = self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def signer_for(key: PrivateKey) -> Signer:
    """A `Signer` for an Ed25519 (EdDSA, -8) or P-256 (ES256, -7) private key."""
    if isinstance(key, Ed25519PrivateKey):
        return Signer(key, ALG_EDDSA, kid_for(key.public_key()))
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return Signer(key, ALG_ES256, kid_for(key.public_key()))
    raise EncodingError(f"unsupported signing key {type(key).__name__}: need Ed25519 or P-256")


def _check_id(kind: str, value: str, forbidden: str) -> None:
    if not value or any(ch in value for ch in forbidden):
        raise EncodingError(f"{kind} {value!r} must be non-empty without any of {forbidden!r}")


def _number(value: float) -> int | float:
    """Integral values as integers, others as floats (cbor2 picks the shortest width)."""
    if not math.isfinite(value):
        raise EncodingError(f"non-finite number {value!r} cannot be sent")
    if float(value).is_integer() and abs(value) < _SAFE_INT:
        return int(value)
    return float(value)


def _time_quality_label(reading: Reading) -> str | None:
    """The "tq_" value a reading's record carries, or None (a synced time carries none)."""
    if reading.time_quality == TIME_SYNCED:
        return None
    if reading.time_quality == TIME_BEFORE:
        return TQ_BEFORE
    if reading.time_quality == TIME_UNSYNCED:
        raise EncodingError(
            f"{reading.sensor} {reading.quantity}: its time is boot-relative (clock not set): "
            "it must be corrected to wall time before it is sent"
        )
    raise EncodingError(f"{reading.sensor} {reading.quantity}: unknown time quality")


def encode_senml(gateway_id: str, readings: Sequence[Reading]) -> bytes:
    """The SenML CBOR pack of `readings`, one record group per sensor.

    Groups follow the order in which sensors first appear; each group's first
    record carries the base name and the group's first time as base time.
    The same readings always give the same bytes.
    """
    _check_id("gateway id", gateway_id, ":/+#")
    if not readings:
        raise EncodingError("a SenML pack needs at least one reading")
    groups: dict[str, list[Reading]] = {}
    for reading in readings:
        _check_id("sensor id", reading.sensor, ":")
        _time_quality_label(reading)
        groups.setdefault(reading.sensor, []).append(reading)
    pack: list[dict[int | str, Any]] = []
    for sensor, group in groups.items():
        base_time = group[0].time
        for index, reading in enumerate(group):
            record: dict[int | str, Any] = {}
            if index == 0:
                record[_BN] = f"{_URN_PREFIX}{gateway_id}:{sensor}:"
                record[_BT] = _number(base_time)
            record[_N] = reading.quantity
            record[_U] = reading.unit
            record[_V] = _number(reading.value)
            offset = _number(reading.time - base_time)
            if offset != 0:
                record[_T] = offset
            quality = _time_quality_label(reading)
            if quality is not None:
                record[_TQ] = quality
            pack.append(record)
    return cbor2.dumps(pack, canonical=True)


def _status_value(name: str, value: object) -> tuple[int, Any]:
    """The SenML label and CBOR value for one record value (bool before int: True is an int)."""
    if isinstance(value, bool):
        return _VB, value
    if isinstance(value, str):
        return _VS, value
    if isinstance(value, int | float):
        return _V, _number(value)
    raise EncodingError(f"record {name!r}: cannot send a {type(value).__name__}")


def check_name(kind: str, value: str) -> None:
    """Refuse a status subject, record name or event kind outside letters, digits, . _ -."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise EncodingError(f"{kind} {value!r} must be letters, digits, '.', '_' or '-'")


def encode_status(
    gateway_id: str, groups: Mapping[str, Sequence[StatusRecord]], time: float
) -> bytes:
    """The SenML CBOR pack of status `groups` (health, events), all stamped `time`.

    Each group is a subject (a sensor id, or "agent" for the gateway) whose
    first record carries the base name `urn:dev:citygate:<gateway>:<subject>:`
    and `time` as base time; values go as v, vs or vb. The same arguments
    always give the same bytes.
    """
    _check_id("gateway id", gateway_id, ":/+#")
    if not groups:
        raise EncodingError("a status pack needs at least one group")
    base_time = _number(time)
    pack: list[dict[int, Any]] = []
    for subject, records in groups.items():
        check_name("subject", subject)
        if not records:
            raise EncodingError(f"group {subject!r} has no records")
        for index, (name, unit, value) in enumerate(records):
            check_name("record name", name)
            record: dict[int, Any] = {}
            if index == 0:
                record[_BN] = f"{_URN_PREFIX}{gateway_id}:{subject}:"
                record[_BT] = base_time
            record[_N] = name
            if unit:
                record[_U] = unit
            label, encoded = _status_value(name, value)
            record[label] = encoded
            pack.append(record)
    return cbor2.dumps(pack, canonical=True)


def _sig_structure(protected: bytes, topic: str, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, topic.encode("utf-8"), payload])


def seal(senml: bytes, *, signer: Signer, gateway_id: str, seq: int, iat: int, topic: str) -> bytes:
    """Sign `senml` as a tagged COSE_Sign1 bound to `topic` (its external_aad)."""
    _check_id("gateway id", gateway_id, ":/+#")
    if not 0 <= seq < 2 ** (8 * SEQ_BYTES):
        raise EncodingError(f"seq {seq} does not fit in {SEQ_BYTES} bytes")
    if iat < 0:
        raise EncodingError(f"iat {iat} is before 1970")
    claims = {_C_ISS: gateway_id, _C_IAT: iat, _C_SEQ: seq.to_bytes(SEQ_BYTES, "big")}
    header = {_H_ALG: signer.alg, _H_CTY: CONTENT_TYPE_SENML_CBOR, _H_KID: signer.kid}
    protected = cbor2.dumps({**header, _H_CWT: claims}, canonical=True)
    signature = signer.sign(_sig_structure(protected, topic, senml))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, senml, signature]))


# --- receiving side ---------------------------------------------------------


@dataclass(frozen=True)
class TrustedKey:
    """A gateway's public key and the gateway id it speaks for."""

    gateway_id: str
    public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class Record:
    """One verified SenML record with its base values resolved.

    `t` is base time plus record time as sent; RFC 8428's "relative to now"
    reading of small times is not applied (our gateways send absolute times).
    `time_quality` is "" for a synced time, or "before" (`TQ_BEFORE`): the
    reading was taken before `t`, in a boot whose clock was never set.
    """

    sensor: str
    n: str
    u: str
    v: float | str | bool
    t: float
    time_quality: str = ""


_ONLY_OPEN_SEALED: Final = object()


@dataclass(frozen=True)
class VerifiedMessage:
    """Contents of a message whose signature, key and topic have been checked.

    Only `open_sealed` makes these: the constructor demands a private token,
    so holding a `VerifiedMessage` proves the checks ran.
    """

    gateway_id: str
    seq: int
    iat: int
    kid: bytes
    records: tuple[Record, ...]
    _token: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        if self._token is not _ONLY_OPEN_SEALED:
            raise TypeError("VerifiedMessage is made only by agent.envelope.open_sealed")


@dataclass(frozen=True)
class _Header:
    alg: int
    kid: bytes
    gateway_id: str
    iat: int
    seq: int


def _decode(data: bytes, where: str) -> Any:
    """One strict CBOR item filling all of `data`; any decoder failure is a VerificationError."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            read_size=1,
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
        item = decoder.decode()
    # Hostile bytes meet the decoder here, and its semantic tags (dates, UUIDs,
    # regexes, ...) can fail in library-specific ways: translate them all once.
    except Exception as exc:
        raise VerificationError(f"{where}: not valid CBOR ({exc})") from exc
    if stream.tell() != len(data):
        raise VerificationError(f"{where}: {len(data) - stream.tell()} bytes after the CBOR item")
    return item


def _show(value: object) -> str:
    """A short description of a hostile value (huge ints cannot even be printed)."""
    if type(value) is int and abs(value) < 10**18:
        return str(value)
    return f"a value of type {type(value).__name__}"


def _int_keyed(value: object, where: str, allowed: frozenset[int]) -> Mapping[int, Any]:
    if not isinstance(value, Mapping):
        raise VerificationError(f"{where}: must be a map, got {type(value).__name__}")
    for key in value:
        if type(key) is not int or key not in allowed:
            raise VerificationError(f"{where}: unexpected label {_show(key)}")
    return value


def _typed(mapping: Mapping[Any, Any], label: int, kind: type, where: str) -> Any:
    if label not in mapping:
        raise VerificationError(f"{where}: label {label} is missing")
    value = mapping[label]
    if type(value) is not kind:
        raise VerificationError(
            f"{where}: label {label} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _split(message: bytes) -> tuple[bytes, bytes, bytes]:
    """(protected, payload, signature) of a well-formed tagged COSE_Sign1."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise VerificationError(f"message: must be bytes, got {type(message).__name__}")
    if len(message) > MAX_MESSAGE_BYTES:
        raise VerificationError(f"message: {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
    item = _decode(bytes(message), "message")
    if not isinstance(item, cbor2.CBORTag) or item.tag != COSE_SIGN1_TAG:
        raise VerificationError("message: not a COSE_Sign1 (CBOR tag 18)")
    parts = item.value
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise VerificationError("message: COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = parts
    for name, part in (("protected", protected), ("payload", payload), ("signature", signature)):
        if type(part) is not bytes:
            raise VerificationError(f"message: {name} must be a byte string")
    if not isinstance(unprotected, Mapping) or unprotected:
        raise VerificationError("unprotected header: must be an empty map")
    return protected, payload, signature


def _header(protected: bytes) -> _Header:
    where = "protected header"
    header = _int_keyed(
        _decode(protected, where), where, frozenset({_H_ALG, _H_CTY, _H_KID, _H_CWT})
    )
    alg = _typed(header, _H_ALG, int, where)
    if alg not in (ALG_EDDSA, ALG_ES256):
        raise VerificationError(f"{where}: alg must be -8 (EdDSA) or -7 (ES256), got {_show(alg)}")
    if _typed(header, _H_CTY, int, where) != CONTENT_TYPE_SENML_CBOR:
        raise VerificationError(f"{where}: content type must be 112 (application/senml+cbor)")
    kid = _typed(header, _H_KID, bytes, where)
    if len(kid) != KID_BYTES:
        raise VerificationError(f"{where}: kid must be {KID_BYTES} bytes, got {len(kid)}")
    if _H_CWT not in header:
        raise VerificationError(f"{where}: label {_H_CWT} (CWT claims) is missing")
    where = "protected header claims"
    claims = _int_keyed(header[_H_CWT], where, frozenset({_C_ISS, _C_IAT, _C_SEQ}))
    gateway_id = _typed(claims, _C_ISS, str, where)
    iat = _typed(claims, _C_IAT, int, where)
    seq = _typed(claims, _C_SEQ, bytes, where)
    if len(seq) != SEQ_BYTES:
        raise VerificationError(f"protected header: seq must be {SEQ_BYTES} bytes, got {len(seq)}")
    return _Header(alg, kid, gateway_id, iat, int.from_bytes(seq, "big"))


def seq_of(message: bytes) -> int:
    """The seq claimed in the protected header, NOT verified: for logs and duplicate counts only."""
    protected, _payload, _signature = _split(message)
    return _header(protected).seq


def _check_signature(key: PublicKey, signature: bytes, signed: bytes) -> None:
    """Check a raw COSE signature; the caller has already matched alg to the key type."""
    if len(signature) != 64:
        raise VerificationError(f"signature: must be 64 bytes, got {len(signature)}")
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, signed)
        else:
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise VerificationError("signature: does not verify for this key and topic") from exc


def _key_alg(key: PublicKey) -> int | None:
    if isinstance(key, Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ES256
    return None


def _number_or_fail(value: object, where: str) -> float:
    if type(value) not in (int, float):
        raise VerificationError(f"{where}: must be a number, got {type(value).__name__}")
    try:
        number = float(value)  # type: ignore[arg-type]  # int or float, checked above
    except OverflowError as exc:
        raise VerificationError(f"{where}: number out of range") from exc
    if not math.isfinite(number):
        raise VerificationError(f"{where}: must be finite")
    return number


def _sensor_of(base_name: str, gateway_id: str, where: str) -> str:
    middle = base_name.removeprefix(_URN_PREFIX)
    parts = middle.split(":")
    if middle == base_name or len(parts) != 3 or parts[2] or not parts[0] or not parts[1]:
        raise VerificationError(f"{where}: base name must be {_URN_PREFIX}<gateway>:<sensor>:")
    if parts[0] != gateway_id:
        raise VerificationError(f"{where}: base name names gateway {parts[0]!r:.40}")
    return parts[1]


def _record_map(value: object, where: str) -> Mapping[int | str, Any]:
    """A SenML record: known integer labels and our "tq_"; other must-understand labels fail."""
    if not isinstance(value, Mapping):
        raise VerificationError(f"{where}: must be a map, got {type(value).__name__}")
    for key in value:
        if (type(key) is int and key in _RECORD_LABELS) or key == _TQ:
            continue
        if type(key) is str and key.endswith("_"):
            raise VerificationError(
                f"{where}: label {key!r:.40} must be understood (RFC 8428 §4.4) "
                "and is not supported"
            )
        raise VerificationError(f"{where}: unexpected label {_show(key)}")
    return value


def _time_quality(record: Mapping[int | str, Any], where: str) -> str:
    if _TQ not in record:
        return ""
    if type(record[_TQ]) is not str or record[_TQ] != TQ_BEFORE:
        raise VerificationError(f"{where}: label {_TQ} must be {TQ_BEFORE!r}")
    return TQ_BEFORE


def _records(payload: bytes, gateway_id: str) -> tuple[Record, ...]:
    pack = _decode(payload, "payload")
    if not isinstance(pack, list | tuple) or not pack:
        raise VerificationError("payload: SenML pack must be a non-empty array")
    records: list[Record] = []
    sensor: str | None = None
    base_time, base_unit = 0.0, ""
    for index, raw in enumerate(pack):
        where = f"payload record {index}"
        record = _record_map(raw, where)
        if _S in record:
            raise VerificationError(f"{where}: sum values are not supported")
        if _BVER in record:
            _typed(record, _BVER, int, where)
        if _BN in record:
            sensor = _sensor_of(_typed(record, _BN, str, where), gateway_id, where)
        if _BT in record:
            base_time = _number_or_fail(record[_BT], f"{where}: bt")
        if _BU in record:
            base_unit = _typed(record, _BU, str, where)
        if sensor is None:
            raise VerificationError(f"{where}: no base name in force")
        name = _typed(record, _N, str, where)
        unit = _typed(record, _U, str, where) if _U in record else base_unit
        values = [label for label in (_V, _VS, _VB) if label in record]
        if len(values) != 1:
            raise VerificationError(f"{where}: needs exactly one of v, vs, vb")
        value: float | str | bool
        if values[0] == _V:
            value = _number_or_fail(record[_V], f"{where}: v")
        else:
            value = _typed(record, values[0], str if values[0] == _VS else bool, where)
        offset = _number_or_fail(record.get(_T, 0), f"{where}: t")
        time = _number_or_fail(base_time + offset, f"{where}: bt + t")
        records.append(Record(sensor, name, unit, value, time, _time_quality(record, where)))
    return tuple(records)


def open_sealed(
    message: bytes, topic: str, trusted: Mapping[bytes, TrustedKey], *, prefix: str = "citygate"
) -> VerifiedMessage:
    """Verify a message received on `topic` and return its contents.

    Checks, in order: size and COSE_Sign1 shape, the protected header, that
    the kid is trusted and its key suits alg, that the claimed gateway is the
    key's gateway and that `topic` lies under `<prefix>/<gateway>/`, the
    signature with the topic as external_aad, and finally the SenML pack.
    """
    protected, payload, signature = _split(message)
    header = _header(protected)
    entry = trusted.get(header.kid)
    if entry is None:
        raise VerificationError(f"protected header: kid {header.kid.hex()} is not trusted")
    if kid_for(entry.public_key) != header.kid:
        raise VerificationError(f"trusted keys: key filed under kid {header.kid.hex()} differs")
    if _key_alg(entry.public_key) != header.alg:
        raise VerificationError(
            f"protected header: alg {header.alg} does not suit "
            f"the trusted {type(entry.public_key).__name__}"
        )
    if header.gateway_id != entry.gateway_id:
        raise VerificationError(
            f"protected header claims: gateway {header.gateway_id!r:.60} "
            f"but kid belongs to {entry.gateway_id!r}"
        )
    _check_topic(topic, prefix, entry.gateway_id)
    _check_signature(entry.public_key, signature, _sig_structure(protected, topic, payload))
    return VerifiedMessage(
        header.gateway_id,
        header.seq,
        header.iat,
        header.kid,
        _records(payload, header.gateway_id),
        _token=_ONLY_OPEN_SEALED,
    )


def _check_topic(topic: str, prefix: str, gateway_id: str) -> None:
    base = f"{prefix}/{gateway_id}/"
    rest = topic.removeprefix(base)
    if rest == topic or not rest or "+" in rest or "#" in rest:
        raise VerificationError(f"topic: {topic!r:.80} is not under {base!r}")
    try:
        topic.encode("utf-8")
    except UnicodeError as exc:
        raise VerificationError("topic: not encodable as UTF-8") from exc
