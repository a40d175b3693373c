"""Nova Fitness SDS011 wire format: 10-byte sensor frames, 19-byte host commands.

Pure functions of bytes, plus a resynchronising stream parser. Nothing here
does I/O and nothing is imported, so the same file runs under CPython and
MicroPython (keep it that way: builtin types only, no `from __future__`).

Trust: every byte handed in is unverified sensor output. A frame is accepted
only when its head (0xAA), its command byte (0xC0 data or 0xC5 reply), its
tail (0xAB) and its 8-bit sum agree; after any failure the parser moves on by
one byte, because 0xAA can occur inside the data.

Layout (SENSORS.md 2.2, Nova "Laser Dust Sensor Control Protocol" V1.3):
sensor -> host ``AA CMD d1..d6 SUM AB`` with SUM = d1+..+d6 (low 8 bits);
a measurement (C0) holds PM2.5 and PM10 as little-endian tenths of ug/m3 and
the device id in d5 d6; a reply (C5) holds the sub-command in d1. Host ->
sensor ``AA B4 data1..data15 SUM AB``, data1 the sub-command, data14..15 the
target device id (FFFF = any sensor), SUM over data1..data15.
"""

HEAD = 0xAA
TAIL = 0xAB
CMD_DATA = 0xC0  # sensor -> host: a measurement
CMD_REPLY = 0xC5  # sensor -> host: the reply to a command
CMD_HOST = 0xB4  # host -> sensor
FRAME_LEN = 10
COMMAND_LEN = 19
COMMAND_DATA_LEN = 12  # data2..data13
ANY_DEVICE = 0xFFFF

# sub-commands (data1 of a command, d1 of its reply)
SUB_MODE = 2
SUB_QUERY = 4
SUB_SET_ID = 5
SUB_SLEEP = 6
SUB_FIRMWARE = 7
SUB_PERIOD = 8
SUB_NAMES = {
    SUB_MODE: "reporting mode",
    SUB_QUERY: "query data",
    SUB_SET_ID: "set device id",
    SUB_SLEEP: "work state",
    SUB_FIRMWARE: "firmware version",
    SUB_PERIOD: "working period",
}

GET = 0  # data2: ask for the current setting
SET = 1  # data2: change it
MODE_ACTIVE = 0  # the sensor streams a measurement every second (or every period)
MODE_QUERY = 1  # the sensor answers query commands only
SLEEP = 0  # data3 of a sleep/work command or reply; 0 means sleeping (PDF erratum)
WORK = 1
MAX_PERIOD_MIN = 30  # working period 1..30 minutes; 0 = continuous

# Longest run of bytes the parser keeps between calls: one frame short of a byte.
MAX_PENDING = FRAME_LEN - 1


class FrameError(ValueError):
    """Bytes that are not a valid SDS011 frame or command; the message says why."""


def checksum(data: bytes) -> int:
    """Low 8 bits of the sum of `data`."""
    return sum(data) & 0xFF


def _hex(value: int) -> str:
    return f"0x{value:02x}"


def _check_frame(frame: bytes) -> None:
    if len(frame) != FRAME_LEN:
        raise FrameError(f"frame is {len(frame)} bytes, expected {FRAME_LEN}")
    if frame[0] != HEAD:
        raise FrameError(f"bad head {_hex(frame[0])}, expected 0xaa")
    if frame[1] not in (CMD_DATA, CMD_REPLY):
        raise FrameError(f"bad command byte {_hex(frame[1])}, expected 0xc0 or 0xc5")
    if frame[9] != TAIL:
        raise FrameError(f"bad tail {_hex(frame[9])}, expected 0xab")
    expected = checksum(frame[2:8])
    if frame[8] != expected:
        raise FrameError(f"bad checksum: expected {_hex(expected)}, frame has {_hex(frame[8])}")


def parse_frame(frame: bytes) -> tuple[int, bytes]:
    """Return (command byte, the six data bytes) of a valid 10-byte sensor frame."""
    _check_frame(frame)
    return frame[1], bytes(frame[2:8])


def measurement(data: bytes) -> tuple[float, float, int]:
    """(pm2_5, pm10 in ug/m3, device id) from the data bytes of a C0 frame."""
    pm2_5 = (data[0] | (data[1] << 8)) / 10
    pm10 = (data[2] | (data[3] << 8)) / 10
    return pm2_5, pm10, (data[4] << 8) | data[5]


def is_warmup(data: bytes) -> bool:
    """True for the all-zero measurement a sensor sends while its fan spins up."""
    return data[0] == 0 and data[1] == 0 and data[2] == 0 and data[3] == 0


def reply_fields(data: bytes) -> tuple[int, int, int, int, int]:
    """(sub-command, d2, d3, d4, device id) from the data bytes of a C5 frame."""
    return data[0], data[1], data[2], data[3], (data[4] << 8) | data[5]


def answers(sub: int, cmd: int, data: bytes) -> bool:
    """Does the frame (cmd, data) answer a command with sub-command `sub`?

    A query (4) is answered by a measurement; every other command by a C5
    reply carrying its sub-command in d1. Matching by type, not by position,
    lets the host skip the measurements that keep streaming in active mode.
    """
    if sub == SUB_QUERY:
        return cmd == CMD_DATA
    return cmd == CMD_REPLY and data[0] == sub


def decode_frame(frame: bytes) -> list[tuple[str, str, float]]:
    """Records of one sensor frame: PM2.5 and PM10 of a measurement; none for a
    reply or a warm-up (all-zero) measurement."""
    cmd, data = parse_frame(frame)
    if cmd != CMD_DATA or is_warmup(data):
        return []
    pm2_5, pm10, _device = measurement(data)
    return [("pm2_5", "ug/m3", pm2_5), ("pm10", "ug/m3", pm10)]


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one complete frame: a 10-byte sensor frame, or a 19-byte host command
    (valid, but it carries no measurement)."""
    if len(data) == COMMAND_LEN:
        parse_command(data)
        return []
    if len(data) != FRAME_LEN:
        raise FrameError(
            f"frame is {len(data)} bytes, expected {FRAME_LEN} (sensor)"
            f" or {COMMAND_LEN} (host command)"
        )
    return decode_frame(data)


def _setting(sub: int, value: int) -> str:
    if sub == SUB_MODE:
        return "query" if value == MODE_QUERY else "active"
    if sub == SUB_SLEEP:
        return "working" if value == WORK else "sleeping"  # 0 = sleeping (PDF erratum)
    if sub == SUB_PERIOD:
        return "continuous" if value == 0 else f"{value} min"
    return str(value)


def describe_reply(data: bytes) -> str:
    """One line saying what a C5 reply reports (the sleep/work erratum applied)."""
    sub, d2, d3, d4, device = reply_fields(data)
    if sub in (SUB_MODE, SUB_SLEEP, SUB_PERIOD):
        verb = "set to" if d2 == SET else "is"
        text = f"{SUB_NAMES[sub]} {verb} {_setting(sub, d3)}"
    elif sub == SUB_FIRMWARE:
        text = f"firmware 20{d2:02d}-{d3:02d}-{d4:02d}"
    elif sub == SUB_SET_ID:
        text = "device id set"
    else:
        text = f"unknown sub-command {sub}"
    return f"reply: {text} (device {device:04x})"


def describe_frame(frame: bytes) -> str:
    """A note for a valid frame that carries no measurement, else ""."""
    cmd, data = parse_frame(frame)
    if cmd == CMD_REPLY:
        return describe_reply(data)
    if is_warmup(data):
        return "warming up: all-zero measurement"
    return ""


def describe_command(frame: bytes) -> str:
    """One line naming a host command, for `citygate decode` of sniffed traffic."""
    sub, data, device = parse_command(frame)
    name = SUB_NAMES.get(sub, f"unknown sub-command {sub}")
    if sub in (SUB_MODE, SUB_SLEEP, SUB_PERIOD):
        name += f": set {_setting(sub, data[1])}" if data[0] == SET else ": get"
    elif sub == SUB_SET_ID:
        new_id = (data[10] << 8) | data[11]
        name += f": {new_id:04x}"
    return f"host command: {name}, to device {device:04x}"


# -- host commands -----------------------------------------------------------------


def command(sub: int, data: bytes = b"", device_id: int = ANY_DEVICE) -> bytes:
    """Build a 19-byte host command: sub-command, up to 12 data bytes (zero padded),
    target device id (FFFF = any sensor)."""
    if sub < 0 or sub > 0xFF:
        raise FrameError(f"sub-command {sub} out of range")
    if len(data) > COMMAND_DATA_LEN:
        raise FrameError(f"command data is {len(data)} bytes, at most {COMMAND_DATA_LEN}")
    if device_id < 0 or device_id > 0xFFFF:
        raise FrameError(f"device id {device_id} out of range")
    body = bytearray([sub])
    body.extend(data)
    body.extend(bytes(COMMAND_DATA_LEN - len(data)))
    body.append(device_id >> 8)
    body.append(device_id & 0xFF)
    return bytes([HEAD, CMD_HOST]) + bytes(body) + bytes([checksum(bytes(body)), TAIL])


def parse_command(frame: bytes) -> tuple[int, bytes, int]:
    """Return (sub-command, the 12 data bytes, target device id) of a host command."""
    if len(frame) != COMMAND_LEN:
        raise FrameError(f"command is {len(frame)} bytes, expected {COMMAND_LEN}")
    if frame[0] != HEAD or frame[1] != CMD_HOST:
        raise FrameError("bad command header, expected 0xaa 0xb4")
    if frame[18] != TAIL:
        raise FrameError(f"bad command tail {_hex(frame[18])}, expected 0xab")
    expected = checksum(frame[2:17])
    if frame[17] != expected:
        raise FrameError(f"bad command checksum: expected {_hex(expected)}, got {_hex(frame[17])}")
    return frame[2], bytes(frame[3:15]), (frame[15] << 8) | frame[16]


def set_mode(query: bool, device_id: int = ANY_DEVICE) -> bytes:
    """Switch to query mode (True) or active streaming (False); persists in the sensor."""
    return command(SUB_MODE, bytes([SET, MODE_QUERY if query else MODE_ACTIVE]), device_id)


def set_working(work: bool, device_id: int = ANY_DEVICE) -> bytes:
    """Wake the sensor (True) or put it to sleep (False)."""
    return command(SUB_SLEEP, bytes([SET, WORK if work else SLEEP]), device_id)


def set_period(minutes: int, device_id: int = ANY_DEVICE) -> bytes:
    """Working period: 0 = continuous, 1..30 = measure 30 s at the end of every n minutes."""
    if minutes < 0 or minutes > MAX_PERIOD_MIN:
        raise FrameError(f"working period {minutes} out of range 0..{MAX_PERIOD_MIN}")
    return command(SUB_PERIOD, bytes([SET, minutes]), device_id)


def query_data(device_id: int = ANY_DEVICE) -> bytes:
    """Ask for one measurement (query mode)."""
    return command(SUB_QUERY, b"", device_id)


def get_setting(sub: int, device_id: int = ANY_DEVICE) -> bytes:
    """Ask for the current reporting mode, sleep state or working period, or the firmware."""
    return command(sub, bytes([GET]), device_id)


# -- sensor frames (what the emulator sends) ---------------------------------------------


def _frame(cmd: int, data: bytes, checksum_delta: int) -> bytes:
    total = (checksum(data) + checksum_delta) & 0xFF
    return bytes([HEAD, cmd]) + bytes(data) + bytes([total, TAIL])


def data_frame(
    pm2_5_tenths: int, pm10_tenths: int, device_id: int, checksum_delta: int = 0
) -> bytes:
    """Build a measurement frame; `checksum_delta` != 0 makes a deliberately bad one."""
    for value in (pm2_5_tenths, pm10_tenths, device_id):
        if value < 0 or value > 0xFFFF:
            raise FrameError(f"value {value} does not fit 16 bits")
    data = bytes(
        [
            pm2_5_tenths & 0xFF,
            pm2_5_tenths >> 8,
            pm10_tenths & 0xFF,
            pm10_tenths >> 8,
            device_id >> 8,
            device_id & 0xFF,
        ]
    )
    return _frame(CMD_DATA, data, checksum_delta)


def reply_frame(sub: int, d2: int, d3: int, d4: int, device_id: int) -> bytes:
    """Build the C5 reply to a command."""
    data = bytes([sub & 0xFF, d2 & 0xFF, d3 & 0xFF, d4 & 0xFF, device_id >> 8, device_id & 0xFF])
    return _frame(CMD_REPLY, data, 0)


# -- stream -----------------------------------------------------------------------------


class StreamParser:
    """Cut a byte stream from the sensor into valid frames, skipping noise.

    `feed` returns (command byte, six data bytes) per valid frame, oldest first.
    Counters (plain ints): `frames` (valid frames, data or reply), `replies`
    (of them, C5 replies), `bad_frames` (a plausible header whose tail or
    checksum was wrong) and `bad_bytes` (bytes thrown away while
    resynchronising). At most `MAX_PENDING` bytes are carried between calls.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.frames = 0
        self.replies = 0
        self.bad_frames = 0
        self.bad_bytes = 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._pending)

    def reset(self) -> None:
        """Forget partial input (after reopening the port); counters are kept."""
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return every complete valid frame as (command byte, data bytes)."""
        buf = self._pending + bytes(data)
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while pos < end:
            start = buf.find(bytes([HEAD]), pos)
            if start < 0:
                self.bad_bytes += end - pos
                pos = end
                break
            self.bad_bytes += start - pos
            pos = start
            if end - pos < 2:
                break  # a lone head: wait for the command byte
            cmd = buf[pos + 1]
            if cmd not in (CMD_DATA, CMD_REPLY):
                self.bad_bytes += 1
                pos += 1
                continue
            if end - pos < FRAME_LEN:
                break  # wait for the rest of the frame
            frame = buf[pos : pos + FRAME_LEN]
            if frame[9] != TAIL or frame[8] != checksum(frame[2:8]):
                self.bad_frames += 1
                self.bad_bytes += 1
                pos += 1
                continue
            self.frames += 1
            if cmd == CMD_REPLY:
                self.replies += 1
            out.append((cmd, bytes(frame[2:8])))
            pos += FRAME_LEN
        self._pending = buf[pos:]
        return out
