"""MaxBotix MaxSonar serial output: ASCII frames ``R<digits>\\r``, range in mm, cm or inches.

Pure functions of bytes, plus a resynchronising stream parser. Nothing here
does I/O and nothing is imported, so the same file runs under CPython and
MicroPython (builtin types only, no `from __future__`).

Trust: every byte handed in is unverified sensor output. The frames carry no
checksum, so a frame is accepted only when it is exactly ``R``, the digit
count of the model, an optional space (HRUSB) and CR; anything else is
skipped one byte at a time (``R`` never occurs inside a valid frame, so the
parser resynchronises on the next ``R``). Never read fixed 6-byte blocks: a
port opened mid-frame would stay out of step for ever.

Models (SENSORS.md 1.1): HRXL-MaxSonar 5 m (`hrxl`, mm, 4 digits, 5000 = no
target), HRXL 10 m (`hrxl_10m`, 9999 = no target), XL-MaxSonar (`xl`, cm, 3
digits or 4 on 10 m models, max 765/1068), LV-MaxSonar (`lv`, inches, 3
digits, max 255). `auto` (what `decode` uses) takes 4 digits as HRXL mm with
5000 and 9999 both meaning no target, and 3 digits as XL cm.
"""

CR = 13
R = 82  # "R"
SPACE = 32
MAX_FRAME = 7  # R + 4 digits + space + CR
NO_ECHO = "no echo"

# model -> (metres per count as numerator / denominator, allowed digit counts,
#           no-target values, largest valid value); one integer division keeps the
#           result identical under CPython and MicroPython
MODELS = {
    "hrxl": (1, 1000, (4,), (5000,), 4999),
    "hrxl_10m": (1, 1000, (4,), (9999,), 9998),
    "xl": (1, 100, (3, 4), (), 1068),
    "lv": (254, 10000, (3,), (), 255),
}
_AUTO = {4: "hrxl_any", 3: "xl"}
_HRXL_ANY = (1, 1000, (4,), (5000, 9999), 9998)


class FrameError(ValueError):
    """A frame that is not ``R<digits>[ ]\\r`` for the model, or a value out of its range."""


def _model(name: str, digits: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...], int]:
    if name == "auto":
        picked = _AUTO.get(digits)
        if picked is None:
            raise FrameError("expected 3 or 4 digits, got " + str(digits))
        return _HRXL_ANY if picked == "hrxl_any" else MODELS[picked]
    if name not in MODELS:
        raise FrameError("unknown model " + repr(name))
    return MODELS[name]


def parse_frame(frame: bytes) -> tuple[int, int]:
    """Return (value, digit count) of one complete frame; FrameError says what is wrong."""
    n = len(frame)
    if n < 5 or n > MAX_FRAME:
        raise FrameError("frame is " + str(n) + " bytes, expected 5 to 7 (R, digits, CR)")
    if frame[0] != R:
        raise FrameError(f"frame must start with 'R' (0x52), got 0x{frame[0]:02x}")
    if frame[n - 1] != CR:
        raise FrameError(f"frame must end with CR (0x0d), got 0x{frame[n - 1]:02x}")
    body = frame[1 : n - 1]
    if body and body[len(body) - 1] == SPACE:
        body = body[: len(body) - 1]
    value = 0
    for byte in body:
        if byte < 48 or byte > 57:
            raise FrameError(f"non-digit 0x{byte:02x} in range field")
        value = value * 10 + (byte - 48)
    if len(body) < 3 or len(body) > 4:
        raise FrameError("expected 3 or 4 digits, got " + str(len(body)))
    return value, len(body)


def records(value: int, digits: int, model: str = "auto") -> list[tuple[str, str, float]]:
    """Distance records for a parsed value; [] for the model's no-target value."""
    num, den, allowed, no_target, largest = _model(model, digits)
    if digits not in allowed:
        raise FrameError(str(digits) + " digits do not fit model " + model)
    if value in no_target:
        return []
    if value > largest:
        raise FrameError("range " + str(value) + " is beyond model " + model + "'s maximum")
    return [("distance", "m", value * num / den)]


def decode_model(data: bytes, model: str = "auto") -> list[tuple[str, str, float]]:
    """Decode one frame for `model`; [] means no target (nothing within range)."""
    value, digits = parse_frame(data)
    return records(value, digits, model)


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one frame with the `auto` model (4 digits mm, 3 digits cm)."""
    return decode_model(data, "auto")


def frame_for(value: int, digits: int) -> bytes:
    """Build the frame a sensor sends for `value` (zero-padded to `digits`)."""
    text = str(value)
    if len(text) > digits:
        raise ValueError(str(value) + " does not fit " + str(digits) + " digits")
    return b"R" + ("0" * (digits - len(text)) + text).encode() + b"\r"


class StreamParser:
    """Cut a byte stream into frames, resynchronising on ``R``.

    `feed` returns one (records, note) pair per valid frame, oldest first:
    note is "no echo" (and records empty) for the model's no-target value.
    Counters: `frames`, `no_echo`, `bad_frames` (an ``R`` not followed by a
    valid frame), `bad_bytes` (bytes skipped). At most MAX_FRAME - 1 bytes
    are carried from one `feed` to the next.
    """

    def __init__(self, model: str = "auto") -> None:
        if model != "auto" and model not in MODELS:
            raise ValueError("unknown model " + repr(model))
        self.model = model
        self._pending = b""
        self.frames = 0
        self.no_echo = 0
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
            start = buf.find(b"R", pos)
            if start < 0:
                self.bad_bytes += n - pos
                pos = n
                break
            self.bad_bytes += start - pos
            pos = start
            end = buf.find(b"\r", pos, pos + MAX_FRAME)
            if end < 0:
                if n - pos < MAX_FRAME and _may_continue(buf, pos):
                    break  # wait for the rest of the frame
                self._bad()
                pos += 1
                continue
            try:
                value, digits = parse_frame(buf[pos : end + 1])
                recs = records(value, digits, self.model)
            except ValueError:
                self._bad()
                pos += 1
                continue
            self.frames += 1
            if recs:
                out.append((recs, ""))
            else:
                self.no_echo += 1
                out.append((recs, NO_ECHO))
            pos = end + 1
        self._pending = buf[pos:]
        return out

    def _bad(self) -> None:
        self.bad_frames += 1
        self.bad_bytes += 1


def _may_continue(buf: bytes, pos: int) -> bool:
    """True if buf[pos:] (starting with R, no CR yet) can still become a valid frame."""
    tail = buf[pos + 1 :]
    for i in range(len(tail)):
        byte = tail[i]
        if 48 <= byte <= 57 and i < 4:
            continue
        if byte == SPACE and i == len(tail) - 1 and i >= 3:
            continue
        return False
    return True
