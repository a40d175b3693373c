"""Modbus wire format and register decoding: RTU and TCP frames, CRC, fields, request plans.

Pure functions of bytes and plain values; nothing is imported, so the same
file runs under CPython and MicroPython (keep it that way: builtin types only,
no `from __future__`, no struct, no typing at run time).

What it covers (SENSORS.md §3, §5, §6):

- CRC-16/MODBUS (init 0xFFFF, reflected polynomial 0xA001, sent low byte first).
- RTU ADUs (unit id, PDU, CRC) and Modbus TCP ADUs (7-byte MBAP header, PDU):
  read requests and replies (functions 3 and 4), write single register (6),
  write multiple registers (16) and exception replies (function | 0x80, code).
- Register fields: int16, uint16, int32, uint32, float32 (IEEE-754 decoded
  from its bits here, by hand), word orders ABCD, CDAB, BADC, DCBA, then
  ``value = raw * scale + offset``.
- The request planner: the fields of one device coalesced into as few reads as
  the device's registers-per-request limit allows, filling gaps up to a limit
  per function code and never reading across a declared unreadable hole.
- RTU timing: character time, t1.5 and t3.5 (fixed 0.75 / 1.75 ms above 19200 baud).

`decode(data)` takes one complete ADU (RTU, or TCP when it is not a valid RTU
frame) and returns its raw content as records with unit "": for a read reply
``("unit_id", "", u), ("function", "", f), ("register_0", "", r0), ...`` where
``register_<n>`` is the n-th register of the reply (a reply does not carry its
start address); for a read request unit_id, function, start, quantity; for
write single unit_id, function, address, value; for write multiple unit_id,
function, start, quantity (and register_<n> for the request); for an exception
reply unit_id, function (with bit 7 set) and exception_code. A TCP ADU adds
``transaction_id`` first. Turning registers into quantities needs a register
map (see `decode_fields`; the driver's profiles supply it).

Trust: every byte handed in is unverified. An RTU frame is accepted only when
its CRC, function code and length agree; a TCP frame only when its protocol id
is 0 and its length field matches. Errors are `ModbusFrameError` (a
ValueError) with the precise reason.
"""

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

READ_HOLDING = 3
READ_INPUT = 4
WRITE_SINGLE = 6
WRITE_MULTIPLE = 16
READ_FUNCTIONS = (READ_HOLDING, READ_INPUT)
MAX_READ_REGISTERS = 125  # Modbus application protocol limit for functions 3 and 4
MAX_WRITE_REGISTERS = 123

# field type -> registers it occupies
TYPE_REGISTERS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")

RTU_REQUEST_LEN = 8  # unit, function, start (2), quantity (2), CRC (2)
RTU_REPLY_OVERHEAD = 5  # unit, function, byte count, CRC (2)
RTU_EXCEPTION_LEN = 5
TCP_HEADER_LEN = 7  # MBAP: transaction (2), protocol (2), length (2), unit (1)

FIXED_T15_S = 0.00075
FIXED_T35_S = 0.00175


class ModbusFrameError(ValueError):
    """Bytes that are not a valid Modbus frame, or values that cannot be encoded."""


class PlanError(ValueError):
    """A register map that cannot be read within the device's limits."""


# -- CRC ----------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS of `data` as an integer (its low byte goes first on the wire)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


def with_crc(body: bytes) -> bytes:
    """`body` followed by its CRC, low byte first: a complete RTU ADU."""
    crc = crc16(body)
    return bytes(body) + bytes([crc & 0xFF, crc >> 8])


def _check_crc(frame: bytes) -> None:
    if len(frame) < 4:
        raise ModbusFrameError(f"frame is {len(frame)} bytes, an RTU ADU has at least 4")
    expected = crc16(frame[:-2])
    actual = frame[-2] | (frame[-1] << 8)
    if expected != actual:
        raise ModbusFrameError(f"bad CRC: computed 0x{expected:04x}, frame has 0x{actual:04x}")


# -- building frames -----------------------------------------------------------------


def _word(value: int) -> bytes:
    if value < 0 or value > 0xFFFF:
        raise ModbusFrameError(f"value {value} does not fit 16 bits")
    return bytes([value >> 8, value & 0xFF])


def _check_unit(unit: int) -> None:
    if unit < 0 or unit > 255:
        raise ModbusFrameError(f"unit id {unit} is outside 0-255")


def read_request_pdu(function: int, start: int, count: int) -> bytes:
    """PDU of a read of `count` registers from `start` (function 3 or 4)."""
    if function not in READ_FUNCTIONS:
        raise ModbusFrameError(f"function {function} is not a register read (3 or 4)")
    if count < 1 or count > MAX_READ_REGISTERS:
        raise ModbusFrameError(f"a read asks for 1 to 125 registers, not {count}")
    if start + count > 0x10000:
        raise ModbusFrameError(f"registers {start}+{count} pass 65535")
    return bytes([function]) + _word(start) + _word(count)


def read_request(unit: int, function: int, start: int, count: int) -> bytes:
    """RTU ADU of a register read."""
    _check_unit(unit)
    return with_crc(bytes([unit]) + read_request_pdu(function, start, count))


def read_reply(unit: int, function: int, registers: list[int]) -> bytes:
    """RTU ADU of a read reply carrying `registers`."""
    _check_unit(unit)
    body = bytearray([unit, function, 2 * len(registers)])
    for value in registers:
        body += _word(value)
    return with_crc(bytes(body))


def write_single_request(unit: int, address: int, value: int) -> bytes:
    """RTU ADU writing one holding register (function 6); the device echoes it."""
    _check_unit(unit)
    return with_crc(bytes([unit, WRITE_SINGLE]) + _word(address) + _word(value))


def exception_reply(unit: int, function: int, code: int) -> bytes:
    """RTU ADU of an exception reply to `function` with `code`."""
    _check_unit(unit)
    return with_crc(bytes([unit, (function | 0x80) & 0xFF, code & 0xFF]))


def tcp_adu(transaction: int, unit: int, pdu: bytes) -> bytes:
    """Modbus TCP ADU: MBAP header (protocol 0, length = unit + PDU) and the PDU."""
    _check_unit(unit)
    return _word(transaction) + b"\x00\x00" + _word(len(pdu) + 1) + bytes([unit]) + pdu


# -- parsing frames ------------------------------------------------------------------
# A parsed frame is a tuple (kind, unit, function, start, quantity, values, code):
#   kind      "read_request", "read_reply", "write_single", "write_request",
#             "write_reply" or "exception"
#   start     first register (-1 for a read reply: it does not say)
#   quantity  number of registers (1 for write_single)
#   values    register values carried (read reply, write request, write_single)
#   code      exception code (0 unless kind is "exception")


def _u16(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _registers(data: bytes, offset: int, count: int) -> list[int]:
    return [_u16(data, offset + 2 * i) for i in range(count)]


def _parse_read(unit: int, pdu: bytes) -> tuple[str, int, int, int, int, list[int], int]:
    function = pdu[0]
    if len(pdu) == 5:  # a reply of 5 PDU bytes would carry 3 data bytes: impossible
        start, count = _u16(pdu, 1), _u16(pdu, 3)
        if count < 1 or count > MAX_READ_REGISTERS:
            raise ModbusFrameError(f"read request for {count} registers (1-125)")
        return ("read_request", unit, function, start, count, [], 0)
    if len(pdu) < 2:
        raise ModbusFrameError(f"function {function} frame has no byte count")
    byte_count = pdu[1]
    if byte_count != len(pdu) - 2:
        raise ModbusFrameError(f"byte count {byte_count} but {len(pdu) - 2} data bytes follow")
    if byte_count == 0 or byte_count % 2:
        raise ModbusFrameError(f"read reply byte count {byte_count} is not 2-250 even")
    count = byte_count // 2
    return ("read_reply", unit, function, -1, count, _registers(pdu, 2, count), 0)


def _parse_write_multiple(unit: int, pdu: bytes) -> tuple[str, int, int, int, int, list[int], int]:
    if len(pdu) == 5:
        return ("write_reply", unit, WRITE_MULTIPLE, _u16(pdu, 1), _u16(pdu, 3), [], 0)
    if len(pdu) < 6:
        raise ModbusFrameError("write multiple frame is too short")
    start, count, byte_count = _u16(pdu, 1), _u16(pdu, 3), pdu[5]
    if count < 1 or count > MAX_WRITE_REGISTERS or byte_count != 2 * count:
        raise ModbusFrameError(f"write of {count} registers with byte count {byte_count}")
    if len(pdu) != 6 + byte_count:
        raise ModbusFrameError(f"byte count {byte_count} but {len(pdu) - 6} data bytes follow")
    return ("write_request", unit, WRITE_MULTIPLE, start, count, _registers(pdu, 6, count), 0)


def parse_pdu(unit: int, pdu: bytes) -> tuple[str, int, int, int, int, list[int], int]:
    """Parse a PDU (function code and data) sent to or by `unit`; see the tuple layout above."""
    if not pdu:
        raise ModbusFrameError("empty PDU")
    function = pdu[0]
    if function & 0x80:
        if len(pdu) != 2:
            raise ModbusFrameError(f"exception reply has {len(pdu)} PDU bytes, not 2")
        return ("exception", unit, function, -1, 0, [], pdu[1])
    if function in READ_FUNCTIONS:
        return _parse_read(unit, pdu)
    if function == WRITE_SINGLE:
        if len(pdu) != 5:
            raise ModbusFrameError(f"write single frame has {len(pdu)} PDU bytes, not 5")
        return ("write_single", unit, function, _u16(pdu, 1), 1, [_u16(pdu, 3)], 0)
    if function == WRITE_MULTIPLE:
        return _parse_write_multiple(unit, pdu)
    raise ModbusFrameError(f"function {function} is not supported (3, 4, 6, 16)")


def parse_rtu(frame: bytes) -> tuple[str, int, int, int, int, list[int], int]:
    """Parse one complete RTU ADU after checking its CRC."""
    _check_crc(frame)
    return parse_pdu(frame[0], frame[1:-2])


def parse_tcp(frame: bytes) -> tuple[int, tuple[str, int, int, int, int, list[int], int]]:
    """Parse one complete Modbus TCP ADU: (transaction id, parsed PDU)."""
    if len(frame) < TCP_HEADER_LEN + 1:
        raise ModbusFrameError(f"TCP frame is {len(frame)} bytes, at least 8 needed")
    if _u16(frame, 2) != 0:
        raise ModbusFrameError(f"MBAP protocol id is {_u16(frame, 2)}, not 0")
    length = _u16(frame, 4)
    if length != len(frame) - 6:
        raise ModbusFrameError(f"MBAP length {length} but {len(frame) - 6} bytes follow")
    return _u16(frame, 0), parse_pdu(frame[6], frame[7:])


def frame_records(
    parsed: tuple[str, int, int, int, int, list[int], int],
) -> list[tuple[str, str, float]]:
    """The raw records of a parsed frame (see the module docstring)."""
    kind, unit, function, start, quantity, values, code = parsed
    out = [("unit_id", "", float(unit)), ("function", "", float(function))]
    if kind == "exception":
        out.append(("exception_code", "", float(code)))
        return out
    if kind == "write_single":
        out.append(("address", "", float(start)))
        out.append(("value", "", float(values[0])))
        return out
    if kind != "read_reply":
        out.append(("start", "", float(start)))
        out.append(("quantity", "", float(quantity)))
    out.extend((f"register_{i}", "", float(values[i])) for i in range(len(values)))
    return out


def parse_any(data: bytes) -> tuple[int, tuple[str, int, int, int, int, list[int], int]]:
    """Parse `data` as an RTU ADU, or else as a TCP ADU: (transaction id or -1, parsed)."""
    try:
        return -1, parse_rtu(data)
    except ModbusFrameError as rtu_error:
        looks_tcp = len(data) >= TCP_HEADER_LEN + 1 and data[2] == 0 and data[3] == 0
        if not looks_tcp or _u16(data, 4) != len(data) - 6:
            raise rtu_error
        try:
            return parse_tcp(data)
        except ModbusFrameError as tcp_error:
            raise ModbusFrameError(f"{rtu_error} (as Modbus TCP: {tcp_error})") from None


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one complete ADU into raw records; ModbusFrameError says why it is bad."""
    transaction, parsed = parse_any(bytes(data))
    records = frame_records(parsed)
    if transaction >= 0:
        records.insert(0, ("transaction_id", "", float(transaction)))
    return records


def exception_text(code: int) -> str:
    """'exception 02 (illegal data address)' for a Modbus exception code."""
    name = EXCEPTION_NAMES.get(code, "unknown")
    return f"exception {code:02d} ({name})"


# -- register fields -------------------------------------------------------------------


def float32_from_bits(bits: int) -> float:
    """The IEEE-754 single-precision value whose 32 bits are `bits`."""
    sign = -1.0 if bits & 0x80000000 else 1.0
    exponent = (bits >> 23) & 0xFF
    fraction = bits & 0x7FFFFF
    if exponent == 0xFF:
        return float("nan") if fraction else sign * float("inf")
    if exponent == 0:  # zero and subnormals: no implicit leading 1
        return sign * fraction * 2.0**-149
    return sign * (0x800000 | fraction) * 2.0 ** (exponent - 150)


def _shift(letter: str) -> int:
    # A is the most significant byte of a 32-bit value, D the least
    return 24 - 8 * (ord(letter) - 65)


def combine32(first: int, second: int, order: str) -> int:
    """The 32-bit value of two registers as received, in word order `order`.

    `order` names the significance of the four bytes in the order they arrive:
    "ABCD" is high word first (big-endian), "CDAB" low word first, "BADC" high
    word first with the bytes of each word swapped, "DCBA" fully reversed.
    """
    if order not in WORD_ORDERS:
        raise ModbusFrameError(f"word order {order} is not one of ABCD CDAB BADC DCBA")
    received = (first >> 8, first & 0xFF, second >> 8, second & 0xFF)
    value = 0
    for i in range(4):
        value |= received[i] << _shift(order[i])
    return value


def split32(value: int, order: str) -> list[int]:
    """The two registers that carry the 32-bit `value` in word order `order` (see combine32)."""
    if order not in WORD_ORDERS:
        raise ModbusFrameError(f"word order {order} is not one of ABCD CDAB BADC DCBA")
    wire = [(value >> _shift(order[i])) & 0xFF for i in range(4)]
    return [(wire[0] << 8) | wire[1], (wire[2] << 8) | wire[3]]


def _word16(value: int, order: str) -> int:
    # orders that swap the bytes inside a word (BADC, DCBA) apply to 16-bit fields too
    if order in ("BADC", "DCBA"):
        return ((value & 0xFF) << 8) | (value >> 8)
    return value


def field_raw(registers: list[int], offset: int, kind: str, order: str) -> float:
    """The unscaled value of a field of type `kind` at `registers[offset]`."""
    size = TYPE_REGISTERS.get(kind, 0)
    if size == 0:
        raise ModbusFrameError(f"field type {kind} is not one of {_type_list()}")
    if offset < 0 or offset + size > len(registers):
        raise ModbusFrameError(f"field at offset {offset} is outside the registers read")
    if size == 1:
        word = _word16(registers[offset], order)
        if kind == "int16" and word & 0x8000:
            return float(word - 0x10000)
        return float(word)
    bits = combine32(registers[offset], registers[offset + 1], order)
    if kind == "float32":
        return float32_from_bits(bits)
    if kind == "int32" and bits & 0x80000000:
        return float(bits - 0x100000000)
    return float(bits)


def _type_list() -> str:
    return " ".join(sorted(TYPE_REGISTERS))


def is_finite(value: float) -> bool:
    """False for NaN and the infinities (a meter's 'no value'); portable, no math module."""
    return value == value and value - value == 0.0  # noqa: PLR0124


def decode_fields(
    fields: list[tuple[str, str, int, str, str, float, float]],
    start: int,
    registers: list[int],
) -> tuple[list[tuple[str, str, float]], list[str]]:
    """Decode the fields that lie wholly inside a block of registers read from `start`.

    Each field is (name, unit, address, kind, order, scale, offset). Returns the
    records, in field order, and the names of fields whose value is NaN or
    infinite (left out of the records). Fields outside the block are skipped.
    """
    records = []
    invalid = []
    end = start + len(registers)
    for name, unit, address, kind, order, scale, offset in fields:
        size = TYPE_REGISTERS.get(kind, 0)
        if address < start or address + size > end:
            continue
        raw = field_raw(registers, address - start, kind, order)
        if not is_finite(raw):
            invalid.append(name)
            continue
        records.append((name, unit, raw * scale + offset))
    return records, invalid


# -- request planning -------------------------------------------------------------------


def _crosses_hole(holes: list[tuple[int, int, int]], function: int, first: int, last: int) -> bool:
    for hole_function, hole_first, hole_last in holes:
        if hole_function == function and hole_first <= last and first <= hole_last:
            return True
    return False


def plan_reads(
    fields: list[tuple[int, int, int]],
    max_registers: int,
    max_gaps: dict[int, int],
    holes: list[tuple[int, int, int]],
) -> list[tuple[int, int, int, list[int]]]:
    """Group fields (function, address, count) into as few reads as the limits allow.

    Returns reads (function, start, count, indices of the fields it covers),
    ordered by function and address; every field is covered by exactly one read.
    A read never exceeds `max_registers`, never skips more than
    `max_gaps[function]` unwanted registers between two fields (0 if absent),
    and never includes a register of a hole (function, first, last).
    PlanError if a field alone breaks a limit or lies in a hole.

    Fields are taken in address order and each read is extended while the
    next field still fits; since any run of a feasible read is itself feasible,
    this greedy grouping needs the fewest reads.
    """
    if max_registers < 1 or max_registers > MAX_READ_REGISTERS:
        raise PlanError(f"max registers per request must be 1-125, not {max_registers}")
    order = sorted(range(len(fields)), key=lambda i: (fields[i][0], fields[i][1], fields[i][2]))
    reads: list[tuple[int, int, int, list[int]]] = []
    current: list[int] = []
    function = start = end = -1  # end: one past the last register of the current read
    for index in order:
        f_function, f_address, f_count = fields[index]
        _check_field(f_function, f_address, f_count, max_registers, holes)
        f_end = f_address + f_count
        if current and f_function == function:
            gap = f_address - end
            new_end = f_end if f_end > end else end
            fits = new_end - start <= max_registers and gap <= max_gaps.get(function, 0)
            if fits and (gap <= 0 or not _crosses_hole(holes, function, end, f_address - 1)):
                current.append(index)
                end = new_end
                continue
        if current:
            reads.append((function, start, end - start, current))
        current = [index]
        function, start, end = f_function, f_address, f_end
    if current:
        reads.append((function, start, end - start, current))
    return reads


def _check_field(
    function: int, address: int, count: int, max_registers: int, holes: list[tuple[int, int, int]]
) -> None:
    where = f"field at function {function} address {address}"
    if function not in READ_FUNCTIONS:
        raise PlanError(where + ": only functions 3 and 4 are read")
    if count > max_registers:
        raise PlanError(f"{where} needs {count} registers, above the maximum")
    if address < 0 or address + count > 0x10000:
        raise PlanError(where + " is outside 0-65535")
    if _crosses_hole(holes, function, address, address + count - 1):
        raise PlanError(where + " lies in a register range declared unreadable")


# -- RTU timing -------------------------------------------------------------------------


def char_time_s(baud: int, bits_per_char: int = 11) -> float:
    """Seconds one character takes on the line (11 bits by the spec, 10 for 8N1)."""
    return bits_per_char / baud


def silent_interval_s(baud: int, bits_per_char: int = 11) -> float:
    """t3.5: the silence that separates frames; fixed 1.75 ms above 19200 baud."""
    if baud > 19200:
        return FIXED_T35_S
    return 3.5 * bits_per_char / baud


def inter_char_limit_s(baud: int, bits_per_char: int = 11) -> float:
    """t1.5: the longest gap allowed inside a frame; fixed 0.75 ms above 19200 baud."""
    if baud > 19200:
        return FIXED_T15_S
    return 1.5 * bits_per_char / baud


def read_reply_len(count: int) -> int:
    """Bytes of an RTU reply carrying `count` registers."""
    return RTU_REPLY_OVERHEAD + 2 * count
