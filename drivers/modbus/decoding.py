"""Registers to readings with a profile: one block of a poll, or frames given to `citygate decode`.

`decode_block` turns the registers of one planned read into records with the
profile's fields, leaving out NaN/infinite values and reporting a set status
bit (a status field makes the whole poll carry no reading). `decode_frames`
does the same for hex from the command line: one ADU, or a request followed
by its reply (the reply alone does not say which registers it holds).

Trust: frames are unverified bytes, checked by the codec; the profile has
already been checked by `drivers.modbus.profile`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.base import Decoded, Record
from drivers.modbus import codec
from drivers.modbus.profile import Field, Profile

_Parsed = tuple[str, int, int, int, int, list[int], int]


@dataclass(frozen=True, slots=True)
class BlockResult:
    """What one block of registers says: published records, bad values, a status problem."""

    records: list[Record] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    status: str = ""


def status_text(f: Field, raw: int) -> str:
    """'meter_status 0x0020 (out of range)' for the set bits of a status word under its mask."""
    set_bits = raw & f.status_mask
    names = [f.status_bits[b] for b in range(len(f.status_bits)) if set_bits >> b & 1]
    detail = f" ({', '.join(names)})" if names else ""
    return f"{f.quantity} 0x{raw:04x}{detail}"


def decode_block(fields: Sequence[Field], start: int, registers: list[int]) -> BlockResult:
    """Decode the fields lying wholly inside `registers` (read from `start`)."""
    inside = [
        f for f in fields if start <= f.address and f.address + f.count <= start + len(registers)
    ]
    records, invalid = codec.decode_fields([f.as_codec_field() for f in inside], start, registers)
    published = {f.quantity for f in inside if f.publish}
    problems = []
    for f in inside:
        if f.status_mask:
            raw = int(codec.field_raw(registers, f.address - start, f.kind, f.word_order))
            if raw & f.status_mask:
                problems.append(status_text(f, raw))
    return BlockResult(
        records=[r for r in records if r[0] in published],
        invalid=invalid,
        status="; ".join(problems),
    )


# -- frames from the command line ------------------------------------------------------


def decode_frames(data: bytes, profile: Profile) -> Decoded:
    """Decode one ADU, or a read request followed by its reply, with `profile`'s fields."""
    try:
        return _single(codec.parse_any(data)[1], profile)
    except codec.ModbusFrameError as whole_error:
        for split in (codec.RTU_REQUEST_LEN, codec.RTU_REQUEST_LEN + 4):  # RTU, TCP request
            pair = _try_pair(data, split)
            if pair is not None:
                return _transaction(pair[0], pair[1], profile)
        raise whole_error


def _try_pair(data: bytes, split: int) -> tuple[_Parsed, _Parsed] | None:
    if len(data) <= split:
        return None
    try:
        request = codec.parse_any(data[:split])[1]
        reply = codec.parse_any(data[split:])[1]
    except codec.ModbusFrameError:
        return None
    return (request, reply) if request[0] == "read_request" else None


def _single(parsed: _Parsed, profile: Profile) -> Decoded:
    kind, unit, function, start, quantity, values, code = parsed
    if kind == "exception":
        return Decoded([], f"{codec.exception_text(code)} to function {function & 0x7F}")
    if kind == "read_request":
        return Decoded(
            [], f"read request: unit {unit}, function {function}, {_span(start, quantity)}"
        )
    if kind == "write_single":
        return Decoded([], f"write of {values[0]} to holding register {start} of unit {unit}")
    if kind == "write_reply":
        return Decoded([], f"write acknowledged: unit {unit}, {_span(start, quantity)}")
    if kind == "write_request":  # the values written, read with the holding-register fields
        holding = [f for f in profile.fields if f.function == codec.READ_HOLDING]
        return _block_decoded(decode_block(holding, start, values), profile, start, quantity)
    starts = [r.start for r in profile.reads if r.function == function and r.count == quantity]
    if len(starts) != 1:
        raise codec.ModbusFrameError(
            f"a lone reply of {quantity} registers (function {function}) does not say where it "
            f"starts and profile {profile.name} plans {len(starts)} such reads; "
            "give the request before the reply"
        )
    return _decode_reply(parsed, starts[0], profile)


def _transaction(request: _Parsed, reply: _Parsed, profile: Profile) -> Decoded:
    _, unit, function, start, quantity, _, _ = request
    if reply[1] != unit or reply[2] & 0x7F != function:
        raise codec.ModbusFrameError(
            f"reply from unit {reply[1]} function {reply[2]} does not answer "
            f"the request to unit {unit} function {function}"
        )
    if reply[0] == "exception":
        return _single(reply, profile)
    if reply[4] != quantity:
        raise codec.ModbusFrameError(
            f"reply carries {reply[4]} registers, request asked {quantity}"
        )
    return _decode_reply(reply, start, profile)


def _decode_reply(reply: _Parsed, start: int, profile: Profile) -> Decoded:
    function, quantity, registers = reply[2], reply[4], reply[5]
    fields = [f for f in profile.fields if f.function == function]
    return _block_decoded(decode_block(fields, start, registers), profile, start, quantity)


def _block_decoded(block: BlockResult, profile: Profile, start: int, quantity: int) -> Decoded:
    if block.status:
        return Decoded([], f"no reading: status {block.status}")
    notes = []
    if block.invalid:
        notes.append(f"not a number: {', '.join(block.invalid)}")
    if not block.records and not block.invalid:
        notes.append(f"no field of profile {profile.name} in {_span(start, quantity)}")
    return Decoded(block.records, "; ".join(notes))


def _span(start: int, quantity: int) -> str:
    if quantity == 1:
        return f"register {start}"
    return f"registers {start}-{start + quantity - 1}"
