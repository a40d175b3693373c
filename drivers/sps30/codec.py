"""Sensirion SPS30 over UART: SHDLC frames, byte stuffing, measured values.

Pure functions of bytes, plus a resynchronising stream parser. Nothing here
does I/O and nothing is imported, so the same file runs under CPython and
MicroPython (keep it that way: builtin types only, no `from __future__`,
float32 decoded by arithmetic rather than `struct`).

Trust: every byte handed in is unverified. A frame is accepted only when it
is delimited by 0x7E, its escapes are valid, its checksum matches and its
length byte agrees with the bytes present. The state byte of a reply is the
sensor's verdict on the command; it is reported, never hidden.

Layout (SENSORS.md 2.4, SPS30 datasheet v1.0 section 5):
host -> sensor (MOSI) ``7E ADR CMD L DATA.. CHK 7E``;
sensor -> host (MISO) ``7E ADR CMD STATE L DATA.. CHK 7E``.
CHK is the bitwise inverse of the low byte of the sum of everything between
the delimiters, computed before stuffing. Stuffing escapes 0x7E, 0x7D, 0x11
and 0x13 as 0x7D followed by the byte XOR 0x20. STATE bit 7 is the device
error flag (a status-register error is set); bits 0..6 are the execution
error code of this command, 0 meaning success.
"""

FLAG = 0x7E
ESCAPE = 0x7D
_ESCAPED = (0x7E, 0x7D, 0x11, 0x13)
ADDRESS = 0x00
WAKE_PULSE = b"\xff"  # one byte (a falling edge) switches a sleeping sensor's UART back on

CMD_START = 0x00
CMD_STOP = 0x01
CMD_READ = 0x03
CMD_SLEEP = 0x10
CMD_WAKE = 0x11
CMD_CLEAN = 0x56
CMD_AUTO_CLEAN = 0x80
CMD_INFO = 0xD0
CMD_VERSION = 0xD1
CMD_STATUS = 0xD2
CMD_RESET = 0xD3
COMMAND_NAMES = {
    CMD_START: "start measurement",
    CMD_STOP: "stop measurement",
    CMD_READ: "read measured values",
    CMD_SLEEP: "sleep",
    CMD_WAKE: "wake-up",
    CMD_CLEAN: "start fan cleaning",
    CMD_AUTO_CLEAN: "auto-cleaning interval",
    CMD_INFO: "device information",
    CMD_VERSION: "read version",
    CMD_STATUS: "read device status register",
    CMD_RESET: "device reset",
}

FORMAT_FLOAT = 0x03  # start measurement: ten big-endian float32
FORMAT_UINT16 = 0x05  # start measurement: ten big-endian uint16
INFO_PRODUCT_TYPE = 0x00
INFO_SERIAL = 0x03

STATE_ERROR_FLAG = 0x80
STATE_NOT_ALLOWED = 0x43
STATE_MEANINGS = {
    0x00: "no error",
    0x01: "wrong data length for this command",
    0x02: "unknown command",
    0x03: "no access right for command",
    0x04: "illegal command parameter or parameter out of allowed range",
    0x28: "internal function argument out of range",
    0x43: "command not allowed in current state",
}

# device status register (read with 0xD2): bit -> meaning
STATUS_BITS = ((21, "fan speed out of range"), (5, "laser failure"), (4, "fan failure"))

# measured values, in the order the sensor sends them: (quantity, unit)
QUANTITIES = (
    ("pm1", "ug/m3"),
    ("pm2_5", "ug/m3"),
    ("pm4", "ug/m3"),
    ("pm10", "ug/m3"),
    ("nc0_5", "/cm3"),
    ("nc1", "/cm3"),
    ("nc2_5", "/cm3"),
    ("nc4", "/cm3"),
    ("nc10", "/cm3"),
    ("particle_size", "um"),
)
FLOAT_VALUES_LEN = 40
UINT16_VALUES_LEN = 20

MAX_DATA = 255
# longest frame on the wire: both flags and every inner byte escaped
MAX_FRAME = 2 + 2 * (5 + MAX_DATA)
MAX_PENDING = MAX_FRAME - 1


class FrameError(ValueError):
    """Bytes that are not a valid SHDLC frame, or values that cannot be decoded."""


def checksum(raw: bytes) -> int:
    """Bitwise inverse of the low byte of the sum of `raw` (the unstuffed frame content)."""
    return 0xFF - (sum(raw) & 0xFF)


def stuff(raw: bytes) -> bytes:
    """Escape 0x7E, 0x7D, 0x11 and 0x13 for the wire."""
    out = bytearray()
    for byte in raw:
        if byte in _ESCAPED:
            out.append(ESCAPE)
            out.append(byte ^ 0x20)
        else:
            out.append(byte)
    return bytes(out)


def unstuff(wire: bytes) -> bytes:
    """Undo `stuff`; FrameError on an escape that the protocol does not produce."""
    out = bytearray()
    escaped = False
    for byte in wire:
        if escaped:
            original = byte ^ 0x20
            if original not in _ESCAPED:
                raise FrameError(f"invalid escape 0x7d 0x{byte:02x}")
            out.append(original)
            escaped = False
        elif byte == ESCAPE:
            escaped = True
        elif byte == FLAG:
            raise FrameError("unexpected 0x7e inside a frame")
        else:
            out.append(byte)
    if escaped:
        raise FrameError("frame ends in the middle of an escape")
    return bytes(out)


def _wrap(raw: bytes) -> bytes:
    body = bytearray(raw)
    body.append(checksum(raw))
    return bytes([FLAG]) + stuff(bytes(body)) + bytes([FLAG])


def mosi_frame(cmd: int, data: bytes = b"", address: int = ADDRESS) -> bytes:
    """Build a host -> sensor frame, stuffed and delimited."""
    if len(data) > MAX_DATA:
        raise FrameError(f"data is {len(data)} bytes, at most {MAX_DATA}")
    return _wrap(bytes([address & 0xFF, cmd & 0xFF, len(data)]) + bytes(data))


def miso_frame(
    cmd: int, state: int = 0, data: bytes = b"", address: int = ADDRESS, checksum_delta: int = 0
) -> bytes:
    """Build a sensor -> host frame; `checksum_delta` != 0 makes a deliberately bad one."""
    if len(data) > MAX_DATA:
        raise FrameError(f"data is {len(data)} bytes, at most {MAX_DATA}")
    raw = bytes([address & 0xFF, cmd & 0xFF, state & 0xFF, len(data)]) + bytes(data)
    body = bytearray(raw)
    body.append((checksum(raw) + checksum_delta) & 0xFF)
    return bytes([FLAG]) + stuff(bytes(body)) + bytes([FLAG])


def frame_content(frame: bytes) -> bytes:
    """The unstuffed content of one delimited frame with its checksum verified
    (checksum byte included at the end)."""
    if len(frame) < 2 or frame[0] != FLAG or frame[-1] != FLAG:
        raise FrameError("a frame starts and ends with 0x7e")
    content = unstuff(frame[1:-1])
    if len(content) < 4:
        raise FrameError(f"frame content is {len(content)} bytes, at least 4 expected")
    expected = checksum(content[:-1])
    if content[-1] != expected:
        raise FrameError(f"bad checksum: expected 0x{expected:02x}, frame has 0x{content[-1]:02x}")
    return content


def _is_miso(content: bytes) -> bool:
    # ADR CMD STATE L DATA.. CHK; an error reply carries no data (assumed, see README)
    if len(content) < 5 or content[3] != len(content) - 5:
        return False
    return content[2] & 0x7F == 0 or content[3] == 0


def _is_mosi(content: bytes) -> bool:
    # ADR CMD L DATA.. CHK
    return content[2] == len(content) - 4


def parse_miso(frame: bytes) -> tuple[int, int, int, bytes]:
    """(address, command, state, data) of one sensor -> host frame."""
    content = frame_content(frame)
    if len(content) < 5 or content[3] != len(content) - 5:
        raise FrameError(f"length byte does not match the {len(content) - 5} data bytes")
    return content[0], content[1], content[2], content[4:-1]


def parse_mosi(frame: bytes) -> tuple[int, int, bytes]:
    """(address, command, data) of one host -> sensor frame."""
    content = frame_content(frame)
    if not _is_mosi(content):
        raise FrameError(f"length byte does not match the {len(content) - 4} data bytes")
    return content[0], content[1], content[3:-1]


def classify(frame: bytes) -> str:
    """ "miso" or "mosi": which way a valid frame travels, from its length byte."""
    content = frame_content(frame)
    if _is_miso(content):
        return "miso"
    if _is_mosi(content):
        return "mosi"
    raise FrameError("length byte matches neither a command nor a reply")


# -- values ------------------------------------------------------------------------------


def _float32(data: bytes, offset: int) -> float:
    """A big-endian IEEE 754 single, given as the shortest decimal that maps back to it."""
    bits = (data[offset] << 24) | (data[offset + 1] << 16) | (data[offset + 2] << 8)
    bits |= data[offset + 3]
    exponent = (bits >> 23) & 0xFF
    fraction = bits & 0x7FFFFF
    if exponent == 0xFF:
        what = "NaN" if fraction else "infinite"
        raise FrameError(f"value at byte {offset} is {what}")
    if exponent == 0:
        ulp = 2.0**-149
        value = fraction * ulp
    else:
        ulp = 2.0 ** (exponent - 150)
        value = (fraction | 0x800000) * ulp
    if bits >> 31:
        value = -value
    for digits in range(1, 10):
        candidate = float(("%." + str(digits) + "g") % value)
        if abs(candidate - value) * 2 < ulp:
            return candidate
    return value


def measured_values(data: bytes) -> list[tuple[str, str, float]]:
    """Records of a "read measured values" reply: 40 bytes (float format), 20 bytes
    (uint16 format; particle size sent in nm) or none (no new values yet)."""
    if len(data) == 0:
        return []
    out = []
    if len(data) == FLOAT_VALUES_LEN:
        for index in range(10):
            name, unit = QUANTITIES[index]
            out.append((name, unit, _float32(data, 4 * index)))
        return out
    if len(data) == UINT16_VALUES_LEN:
        for index in range(10):
            name, unit = QUANTITIES[index]
            raw = (data[2 * index] << 8) | data[2 * index + 1]
            out.append((name, unit, raw / 1000 if index == 9 else float(raw)))
        return out
    raise FrameError(
        f"measured values are {len(data)} bytes, expected 40 (float), 20 (uint16) or 0"
    )


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one complete frame. A "read measured values" reply gives its records;
    any other valid frame (a reply, a refusal, a host command) gives none."""
    if classify(data) == "mosi":
        return []
    _address, cmd, state, values = parse_miso(data)
    if cmd != CMD_READ or state & 0x7F:
        return []
    return measured_values(values)


def state_text(state: int) -> str:
    """What a reply's state byte means, e.g. "0x43: command not allowed in current state"."""
    code = state & 0x7F
    meaning = STATE_MEANINGS.get(code, "unknown error code")
    text = f"0x{state:02x}: {meaning}"
    if state & STATE_ERROR_FLAG:
        text += "; device error flag set (see the status register)"
    return text


def status_text(register: int) -> str:
    """The set flags of the device status register, or "ok"."""
    flags = [text for bit, text in STATUS_BITS if register >> bit & 1]
    return ", ".join(flags) if flags else "ok"


def status_register(data: bytes) -> int:
    """The 32-bit register from a 0xD2 reply (4 bytes, then a reserved byte)."""
    if len(data) < 4:
        raise FrameError(f"status reply is {len(data)} bytes, expected 5")
    return (data[0] << 24) | (data[1] << 16) | (data[2] << 8) | data[3]


def info_text(data: bytes) -> str:
    """The ASCII string of a device-information reply, up to its NUL terminator."""
    end = len(data)
    for index in range(len(data)):
        if data[index] == 0:
            end = index
            break
    text = ""
    for byte in data[:end]:
        text += chr(byte) if 0x20 <= byte < 0x7F else "?"
    return text


def describe(frame: bytes) -> str:
    """A note for a valid frame that carries no measurement, else ""."""
    if classify(frame) == "mosi":
        _address, cmd, data = parse_mosi(frame)
        name = COMMAND_NAMES.get(cmd, "unknown command")
        suffix = " data " + "".join(f"{b:02x}" for b in data) if data else ""
        return f"host command 0x{cmd:02x} ({name}){suffix}"
    _address, cmd, state, data = parse_miso(frame)
    name = COMMAND_NAMES.get(cmd, "unknown command")
    if state & 0x7F:
        return f"sensor refused 0x{cmd:02x} ({name}): state {state_text(state)}"
    flag = "; " + state_text(state) if state else ""
    if cmd == CMD_READ and not data:
        return "no new measured values yet" + flag
    if cmd == CMD_READ:
        return "device error flag set: read the status register (0xd2)" if state else ""
    return f"reply to 0x{cmd:02x} ({name}), {len(data)} data bytes{flag}"


# -- stream -----------------------------------------------------------------------------


class StreamParser:
    """Cut a byte stream into valid SHDLC frames, skipping noise and broken frames.

    With `miso=True` (the host's view) `feed` returns (address, command, state,
    data) per valid reply; with `miso=False` (the sensor's view, for emulators)
    it returns (address, command, 0, data) per valid host command. Every 0x7E
    is a frame boundary (stuffing keeps it out of frame content), so after a
    broken frame the parser restarts at its closing flag, which may open the
    next frame. Counters: `frames`, `frame_bytes` (wire bytes of valid
    frames), `bad_frames`, `bad_bytes`. At most `MAX_PENDING` bytes are kept.
    """

    def __init__(self, miso: bool = True) -> None:
        self._miso = miso
        self._pending = b""
        self.frames = 0
        self.frame_bytes = 0
        self.bad_frames = 0
        self.bad_bytes = 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._pending)

    def reset(self) -> None:
        """Forget partial input (after reopening the port); counters are kept."""
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """Add bytes; return every complete valid frame, oldest first."""
        buf = self._pending + bytes(data)
        out: list[tuple[int, int, int, bytes]] = []
        flag = bytes([FLAG])
        pos = 0
        while True:
            start = buf.find(flag, pos)
            if start < 0:
                self.bad_bytes += len(buf) - pos
                pos = len(buf)
                break
            self.bad_bytes += start - pos
            pos = start
            stop = buf.find(flag, pos + 1)
            if stop < 0:
                if len(buf) - pos > MAX_PENDING:
                    self.bad_bytes += 1  # no closing flag in time: not a frame start
                    pos += 1
                    continue
                break
            if stop == pos + 1:
                self.bad_bytes += 1  # two flags in a row: the first closed something else
                pos = stop
                continue
            parsed = self._parse(buf[pos : stop + 1])
            if parsed is None:
                self.bad_frames += 1
                self.bad_bytes += stop - pos
                pos = stop
                continue
            out.append(parsed)
            self.frames += 1
            self.frame_bytes += stop + 1 - pos
            pos = stop + 1
        self._pending = buf[pos:]
        return out

    def _parse(self, frame: bytes) -> tuple[int, int, int, bytes] | None:
        try:
            if self._miso:
                return parse_miso(frame)
            address, cmd, data = parse_mosi(frame)
        except FrameError:
            return None
        return address, cmd, 0, data
