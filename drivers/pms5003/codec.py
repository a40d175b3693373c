"""Plantower PMS5003 wire format: data frames, 7-byte commands, 8-byte acks.

Pure functions of bytes, plus a resynchronising stream parser. Nothing here
does I/O and nothing is imported, so the same file runs under CPython and
MicroPython (keep it that way: builtin types only, no `from __future__`).

Trust: every byte handed in is unverified sensor output. A data frame is
accepted only when its header, its length field and its 16-bit sum agree; the
parser never trusts a header on its own and advances one byte after any
failure, because 0x42 0x4D can occur inside the particle counts.

Layout (SENSORS.md 2.1, Plantower data manual V2.3): ``42 4D``, length 0x001C,
13 big-endian words, 16-bit sum of bytes 0..29 in bytes 30..31. Words 1-3 are
the CF=1 ("factory") values, words 4-6 the atmospheric values we report.
"""

HEADER = b"BM"  # 0x42 0x4D
FRAME_LEN = 32
FRAME_LENGTH_FIELD = 28  # 13 words + checksum
ACK_LEN = 8
ACK_LENGTH_FIELD = 4
COMMAND_LEN = 7

CMD_MODE = 0xE1  # data 0 = passive, 1 = active
CMD_READ = 0xE2  # passive mode: answer one data frame
CMD_SLEEP = 0xE4  # data 0 = sleep, 1 = wake
MODE_PASSIVE = 0
MODE_ACTIVE = 1
SLEEP = 0
WAKE = 1

# (quantity, unit, index of the word in the frame, counted from 0 after the length)
_RECORDS = (
    ("pm1", "ug/m3", 3),
    ("pm2_5", "ug/m3", 4),
    ("pm10", "ug/m3", 5),
)

# Longest run of bytes the parser keeps between calls: one frame short of a byte.
MAX_PENDING = FRAME_LEN - 1


def _word(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _sum16(data: bytes, end: int) -> int:
    return sum(data[:end]) & 0xFFFF


def _check_frame(frame: bytes) -> None:
    if len(frame) != FRAME_LEN:
        raise ValueError(f"frame is {len(frame)} bytes, expected {FRAME_LEN}")
    if frame[0:2] != HEADER:
        raise ValueError(f"bad header 0x{frame[0]:02x} 0x{frame[1]:02x}, expected 0x42 0x4d")
    length = _word(frame, 2)
    if length != FRAME_LENGTH_FIELD:
        raise ValueError(f"bad length field {length}, expected {FRAME_LENGTH_FIELD}")
    expected = _sum16(frame, FRAME_LEN - 2)
    actual = _word(frame, FRAME_LEN - 2)
    if expected != actual:
        raise ValueError(f"bad checksum: expected 0x{expected:04x}, frame has 0x{actual:04x}")


def frame_words(frame: bytes) -> list[int]:
    """Return the 13 data words of a valid frame; ValueError says why a frame is bad."""
    _check_frame(frame)
    return [_word(frame, 4 + 2 * i) for i in range(13)]


def decode_frame(frame: bytes) -> list[tuple[str, str, float]]:
    """Decode one 32-byte data frame into (quantity, unit, value) records (atmospheric PM)."""
    words = frame_words(frame)
    return [(name, unit, float(words[index])) for name, unit, index in _RECORDS]


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one complete data frame (the name every codec shares); see `decode_frame`."""
    return decode_frame(data)


def is_blank(frame: bytes) -> bool:
    """True for a valid frame whose 12 measurement words are all zero: a sensor whose fan
    is still spinning up after power-up or wake (no real air gives zero particle counts)."""
    return all(word == 0 for word in frame_words(frame)[:12])


def encode_frame(words: list[int], checksum_delta: int = 0) -> bytes:
    """Build a data frame from 13 words; `checksum_delta` != 0 makes a deliberately bad one."""
    if len(words) != 13:
        raise ValueError(f"a frame holds 13 words, got {len(words)}")
    out = bytearray(HEADER)
    out.append(0)
    out.append(FRAME_LENGTH_FIELD)
    for value in words:
        if value < 0 or value > 0xFFFF:
            raise ValueError(f"word {value} does not fit 16 bits")
        out.append(value >> 8)
        out.append(value & 0xFF)
    total = (sum(out) + checksum_delta) & 0xFFFF
    out.append(total >> 8)
    out.append(total & 0xFF)
    return bytes(out)


def command(cmd: int, data: int) -> bytes:
    """Build a 7-byte host command: 42 4D CMD DATAH DATAL LRCH LRCL."""
    if cmd < 0 or cmd > 0xFF:
        raise ValueError(f"command byte {cmd} out of range")
    if data < 0 or data > 0xFFFF:
        raise ValueError(f"command data {data} out of range")
    head = bytes([0x42, 0x4D, cmd, data >> 8, data & 0xFF])
    lrc = sum(head) & 0xFFFF
    return head + bytes([lrc >> 8, lrc & 0xFF])


def parse_command(frame: bytes) -> tuple[int, int]:
    """Return (cmd, data) of a 7-byte host command; ValueError if it is malformed."""
    if len(frame) != COMMAND_LEN:
        raise ValueError(f"command is {len(frame)} bytes, expected {COMMAND_LEN}")
    if frame[0:2] != HEADER:
        raise ValueError("bad command header, expected 0x42 0x4d")
    expected = _sum16(frame, 5)
    actual = _word(frame, 5)
    if expected != actual:
        raise ValueError(f"bad command LRC: expected 0x{expected:04x}, got 0x{actual:04x}")
    return frame[2], _word(frame, 3)


def ack_frame(cmd: int, data: int) -> bytes:
    """Build the 8-byte reply to a mode or sleep command: 42 4D 00 04 CMD DATA SUMH SUML."""
    head = bytes([0x42, 0x4D, 0x00, ACK_LENGTH_FIELD, cmd & 0xFF, data & 0xFF])
    total = sum(head) & 0xFFFF
    return head + bytes([total >> 8, total & 0xFF])


def parse_ack(frame: bytes) -> tuple[int, int]:
    """Return (cmd, data) of an 8-byte ack; ValueError if it is malformed."""
    if len(frame) != ACK_LEN:
        raise ValueError(f"ack is {len(frame)} bytes, expected {ACK_LEN}")
    if frame[0:2] != HEADER or _word(frame, 2) != ACK_LENGTH_FIELD:
        raise ValueError("bad ack header, expected 0x42 0x4d 0x00 0x04")
    expected = _sum16(frame, 6)
    actual = _word(frame, 6)
    if expected != actual:
        raise ValueError(f"bad ack checksum: expected 0x{expected:04x}, got 0x{actual:04x}")
    return frame[4], frame[5]


PASSIVE_MODE = command(CMD_MODE, MODE_PASSIVE)
ACTIVE_MODE = command(CMD_MODE, MODE_ACTIVE)
PASSIVE_READ = command(CMD_READ, 0)
SLEEP_COMMAND = command(CMD_SLEEP, SLEEP)
WAKE_COMMAND = command(CMD_SLEEP, WAKE)


class StreamParser:
    """Cut a byte stream into data frames, skipping acks, noise and truncated frames.

    Counters (plain ints): `frames` decoded, `bad_frames` (a header whose length
    field or checksum was wrong), `bad_bytes` (bytes thrown away while
    resynchronising) and `acks` (8-byte command replies). At most
    `MAX_PENDING` bytes are carried from one `feed` to the next.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.frames = 0
        self.bad_frames = 0
        self.bad_bytes = 0
        self.acks = 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._pending)

    def reset(self) -> None:
        """Forget partial input (after reopening the port); counters are kept."""
        self._pending = b""

    def feed(self, data: bytes) -> list[list[tuple[str, str, float]]]:
        """Add bytes; return the records of every complete valid frame, oldest first."""
        return [decode_frame(frame) for frame in self.feed_frames(data)]

    def feed_frames(self, data: bytes) -> list[bytes]:
        """Add bytes; return every complete valid 32-byte frame, oldest first."""
        buf = self._pending + bytes(data)
        out: list[bytes] = []
        pos = 0
        while True:
            start = buf.find(HEADER, pos)
            if start < 0:
                # keep a trailing 0x42: it may be the first half of a header
                # (only if it is not the last byte of a frame already consumed)
                keep = len(buf)
                if buf[-1:] == HEADER[0:1] and keep - 1 >= pos:
                    keep -= 1
                self.bad_bytes += keep - pos
                pos = keep
                break
            self.bad_bytes += start - pos
            pos = start
            step = self._try_at(buf, pos, out)
            if step == 0:
                break  # need more bytes
            pos += step
        self._pending = buf[pos:]
        return out

    def _try_at(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Examine a header at `pos`; return bytes consumed, or 0 to wait for more input."""
        if len(buf) - pos < 4:
            return 0
        length = _word(buf, pos + 2)
        if length == ACK_LENGTH_FIELD:
            return self._try_ack(buf, pos)
        if length != FRAME_LENGTH_FIELD:
            return self._slide()
        if len(buf) - pos < FRAME_LEN:
            return 0
        frame = buf[pos : pos + FRAME_LEN]
        if _sum16(frame, FRAME_LEN - 2) != _word(frame, FRAME_LEN - 2):
            return self._slide()
        self.frames += 1
        out.append(frame)
        return FRAME_LEN

    def _try_ack(self, buf: bytes, pos: int) -> int:
        if len(buf) - pos < ACK_LEN:
            return 0
        if _sum16(buf[pos : pos + 6], 6) != _word(buf, pos + 6):
            return self._slide()
        self.acks += 1
        return ACK_LEN

    def _slide(self) -> int:
        self.bad_frames += 1
        self.bad_bytes += 1
        return 1
