"""DFRobot A02YYUW and JSN-SR04T serial frames: ``FF H L SUM``, distance in mm.

Pure functions of bytes, plus a resynchronising stream parser. Nothing here
does I/O and nothing is imported, so the same file runs under CPython and
MicroPython (builtin types only, no `from __future__`).

Trust: every byte handed in is unverified sensor output. A frame is accepted
only when it starts with 0xFF and its SUM byte equals (0xFF + H + L) & 0xFF.
A data byte can itself be 0xFF (511 mm is ``FF 01 FF FF``), so the parser
never trusts a 0xFF as a frame start: on a bad sum it moves on by ONE byte.

Range (SENSORS.md 1.2, 1.3): the A02YYUW measures 30-4500 mm with a 30 mm
blind zone (values <= 30 mm are not distances); the JSN-SR04T about
200-6000 mm depending on the board (UNVERIFIED). A reading of 0 is taken as
no echo. Such frames are valid but carry no measurement: they give no
records and a note, never an invented distance.
"""

HEADER = 0xFF
FRAME_LEN = 4
TRIGGER = b"\x55"  # JSN-SR04T mode 3: the host sends this, the sensor answers one frame
NO_ECHO = "no echo"
BELOW_RANGE = "below range"
BEYOND_RANGE = "beyond range"

# model -> (smallest valid mm, largest valid mm)
MODELS = {
    "a02yyuw": (31, 4500),
    "jsn_sr04t": (200, 6000),
}


class FrameError(ValueError):
    """A frame with the wrong length, header or checksum."""


def checksum(head: int, high: int, low: int) -> int:
    return (head + high + low) & 0xFF


def frame_mm(frame: bytes) -> int:
    """The raw distance in mm of one valid 4-byte frame; FrameError says why it is bad."""
    if len(frame) != FRAME_LEN:
        raise FrameError(f"frame is {len(frame)} bytes, expected {FRAME_LEN}")
    if frame[0] != HEADER:
        raise FrameError(f"bad header 0x{frame[0]:02x}, expected 0xff")
    expected = checksum(frame[0], frame[1], frame[2])
    if frame[3] != expected:
        raise FrameError(f"bad checksum: expected 0x{expected:02x}, frame has 0x{frame[3]:02x}")
    return (frame[1] << 8) | frame[2]


def classify(mm: int, model: str = "a02yyuw") -> tuple[list[tuple[str, str, float]], str]:
    """(records, note) for a raw value: a distance in m, or no records and the reason."""
    if model not in MODELS:
        raise ValueError("unknown model " + repr(model))
    low, high = MODELS[model]
    if mm == 0:
        return [], NO_ECHO
    if mm < low:
        return [], BELOW_RANGE
    if mm > high:
        return [], BEYOND_RANGE
    return [("distance", "m", mm / 1000)], ""


def decode_model(data: bytes, model: str = "a02yyuw") -> tuple[list[tuple[str, str, float]], str]:
    """Decode one frame for `model` into (records, note)."""
    return classify(frame_mm(data), model)


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one A02YYUW frame; [] for a valid frame outside the measuring range."""
    return classify(frame_mm(data), "a02yyuw")[0]


def encode(mm: int, checksum_delta: int = 0) -> bytes:
    """Build the frame for `mm`; `checksum_delta` != 0 makes a deliberately bad one."""
    if mm < 0 or mm > 0xFFFF:
        raise ValueError(f"{mm} mm does not fit 16 bits")
    high, low = mm >> 8, mm & 0xFF
    return bytes([HEADER, high, low, (checksum(HEADER, high, low) + checksum_delta) & 0xFF])


class StreamParser:
    """Cut a byte stream into frames; on a bad checksum slide one byte.

    `feed` returns one (records, note) pair per valid frame, oldest first;
    note is "" for a distance, else NO_ECHO / BELOW_RANGE / BEYOND_RANGE.
    Counters: `frames`, `flagged` (valid frames with no distance),
    `bad_frames` (a 0xFF whose frame failed the sum), `bad_bytes` (bytes
    skipped). At most 3 bytes are carried from one `feed` to the next.
    """

    def __init__(self, model: str = "a02yyuw") -> None:
        if model not in MODELS:
            raise ValueError("unknown model " + repr(model))
        self.model = model
        self._pending = b""
        self.frames = 0
        self.flagged = 0
        self.bad_frames = 0
        self.bad_bytes = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def reset(self) -> None:
        """Forget partial input (after reopening the port); counters are kept."""
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[list[tuple[str, str, float]], str]]:
        buf = self._pending + bytes(data)
        out = []
        pos = 0
        n = len(buf)
        while pos < n:
            if buf[pos] != HEADER:
                self.bad_bytes += 1
                pos += 1
                continue
            if n - pos < FRAME_LEN:
                break  # wait for the rest
            if buf[pos + 3] != checksum(HEADER, buf[pos + 1], buf[pos + 2]):
                self.bad_frames += 1
                self.bad_bytes += 1
                pos += 1
                continue
            mm = (buf[pos + 1] << 8) | buf[pos + 2]
            records, note = classify(mm, self.model)
            self.frames += 1
            if note:
                self.flagged += 1
            out.append((records, note))
            pos += FRAME_LEN
        self._pending = buf[pos:]
        return out
