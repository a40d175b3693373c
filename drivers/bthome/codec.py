"""BTHome v2 service data (UUID 0xFCD2): device information byte, then measurement objects.

Pure functions of bytes. Nothing is imported, so the same file runs under
CPython and MicroPython (builtin types only, no `from __future__`, byte math
instead of `struct`). Decryption lives in `crypto.py` (CPython only); it hands
back plaintext service data that `decode` reads.

Input is the service data as bleak delivers it: the bytes after the 16-bit
UUID, starting with the device information byte (bit 0 encrypted, bit 1 "MAC
included" as bthome-ble reads it, bit 2 trigger-based, bits 5-7 version = 2).
`from_advertisement` cuts it out of raw advertising data.

Trust: every byte is unverified radio input. There is no checksum in plain
BTHome; a packet is accepted only if its version is 2 and every object id is
known and complete. An unknown id makes the rest unparseable (its length is
unknown), so the whole packet is rejected rather than half-read.

Objects are an id byte then a little-endian value of a length fixed by the id
(text 0x53 and raw 0x54 carry a length byte). Values are converted to the
project's quantity names and SenML units (DESIGN.md §5): hPa -> Pa, kWh -> J,
mm -> m, lb -> kg, m3/h -> m3/s, uS/cm -> S/m.
"""

SERVICE_UUID = 0xFCD2
VERSION = 2

INFO_ENCRYPTED = 0x01
INFO_MAC_INCLUDED = 0x02
INFO_TRIGGER = 0x04
_VERSION_SHIFT = 5

OBJ_PACKET_ID = 0x00
OBJ_BUTTON = 0x3A
OBJ_DIMMER = 0x3C
OBJ_TEXT = 0x53
OBJ_RAW = 0x54

# kinds of objects
_NUMBER = 0  # value = raw * mul / div
_BINARY = 1  # 0 or 1
_DIMMER = 2  # event byte + steps: +steps right, -steps left
_SKIP = 3  # text / raw: a length byte, no measurement
_PACKET = 4  # packet id: deduplication, not a measurement

# id: (quantity, unit, size in bytes, signed, mul, div, kind)
_OBJECTS = {
    0x00: ("packet_id", "/", 1, False, 1, 1, _PACKET),
    0x01: ("battery", "%", 1, False, 1, 1, _NUMBER),
    0x02: ("temperature", "Cel", 2, True, 1, 100, _NUMBER),
    0x03: ("humidity", "%RH", 2, False, 1, 100, _NUMBER),
    0x04: ("pressure", "Pa", 3, False, 1, 1, _NUMBER),  # 0.01 hPa = 1 Pa
    0x05: ("illuminance", "lx", 3, False, 1, 100, _NUMBER),
    0x06: ("mass", "kg", 2, False, 1, 100, _NUMBER),
    0x07: ("mass", "kg", 2, False, 45359237, 10**10, _NUMBER),  # 0.01 lb
    0x08: ("dew_point", "Cel", 2, True, 1, 100, _NUMBER),
    0x09: ("count", "/", 1, False, 1, 1, _NUMBER),
    0x0A: ("energy", "J", 3, False, 3600, 1, _NUMBER),  # 0.001 kWh = 3600 J
    0x0B: ("power", "W", 3, False, 1, 100, _NUMBER),
    0x0C: ("voltage", "V", 2, False, 1, 1000, _NUMBER),
    0x0D: ("pm2_5", "ug/m3", 2, False, 1, 1, _NUMBER),
    0x0E: ("pm10", "ug/m3", 2, False, 1, 1, _NUMBER),
    0x0F: ("generic", "/", 1, False, 1, 1, _BINARY),
    0x10: ("power_on", "/", 1, False, 1, 1, _BINARY),
    0x11: ("opening", "/", 1, False, 1, 1, _BINARY),
    0x12: ("co2", "ppm", 2, False, 1, 1, _NUMBER),
    0x13: ("tvoc", "ug/m3", 2, False, 1, 1, _NUMBER),
    0x14: ("moisture", "%", 2, False, 1, 100, _NUMBER),
    0x15: ("battery_low", "/", 1, False, 1, 1, _BINARY),
    0x16: ("battery_charging", "/", 1, False, 1, 1, _BINARY),
    0x17: ("carbon_monoxide", "/", 1, False, 1, 1, _BINARY),
    0x18: ("cold", "/", 1, False, 1, 1, _BINARY),
    0x19: ("connectivity", "/", 1, False, 1, 1, _BINARY),
    0x1A: ("door", "/", 1, False, 1, 1, _BINARY),
    0x1B: ("garage_door", "/", 1, False, 1, 1, _BINARY),
    0x1C: ("gas_detected", "/", 1, False, 1, 1, _BINARY),
    0x1D: ("heat", "/", 1, False, 1, 1, _BINARY),
    0x1E: ("light", "/", 1, False, 1, 1, _BINARY),
    0x1F: ("lock", "/", 1, False, 1, 1, _BINARY),
    0x20: ("moisture_detected", "/", 1, False, 1, 1, _BINARY),
    0x21: ("motion", "/", 1, False, 1, 1, _BINARY),
    0x22: ("moving", "/", 1, False, 1, 1, _BINARY),
    0x23: ("occupancy", "/", 1, False, 1, 1, _BINARY),
    0x24: ("plug", "/", 1, False, 1, 1, _BINARY),
    0x25: ("presence", "/", 1, False, 1, 1, _BINARY),
    0x26: ("problem", "/", 1, False, 1, 1, _BINARY),
    0x27: ("running", "/", 1, False, 1, 1, _BINARY),
    0x28: ("safety", "/", 1, False, 1, 1, _BINARY),
    0x29: ("smoke", "/", 1, False, 1, 1, _BINARY),
    0x2A: ("sound", "/", 1, False, 1, 1, _BINARY),
    0x2B: ("tamper", "/", 1, False, 1, 1, _BINARY),
    0x2C: ("vibration", "/", 1, False, 1, 1, _BINARY),
    0x2D: ("window", "/", 1, False, 1, 1, _BINARY),
    0x2E: ("humidity", "%RH", 1, False, 1, 1, _NUMBER),
    0x2F: ("moisture", "%", 1, False, 1, 1, _NUMBER),
    0x3A: ("button", "/", 1, False, 1, 1, _NUMBER),  # event code, see README
    0x3C: ("dimmer", "/", 2, False, 1, 1, _DIMMER),
    0x3D: ("count", "/", 2, False, 1, 1, _NUMBER),
    0x3E: ("count", "/", 4, False, 1, 1, _NUMBER),
    0x3F: ("rotation", "deg", 2, True, 1, 10, _NUMBER),
    0x40: ("distance", "m", 2, False, 1, 1000, _NUMBER),  # mm
    0x41: ("distance", "m", 2, False, 1, 10, _NUMBER),
    0x42: ("duration", "s", 3, False, 1, 1000, _NUMBER),
    0x43: ("current", "A", 2, False, 1, 1000, _NUMBER),
    0x44: ("speed", "m/s", 2, False, 1, 100, _NUMBER),
    0x45: ("temperature", "Cel", 2, True, 1, 10, _NUMBER),
    0x46: ("uv_index", "/", 1, False, 1, 10, _NUMBER),
    0x47: ("volume", "l", 2, False, 1, 10, _NUMBER),
    0x48: ("volume", "l", 2, False, 1, 1000, _NUMBER),  # mL
    0x49: ("volume_flow_rate", "m3/s", 2, False, 1, 3600000, _NUMBER),  # 0.001 m3/h
    0x4A: ("voltage", "V", 2, False, 1, 10, _NUMBER),
    0x4B: ("gas", "m3", 3, False, 1, 1000, _NUMBER),
    0x4C: ("gas", "m3", 4, False, 1, 1000, _NUMBER),
    0x4D: ("energy", "J", 4, False, 3600, 1, _NUMBER),  # 0.001 kWh
    0x4E: ("volume", "l", 4, False, 1, 1000, _NUMBER),
    0x4F: ("water", "l", 4, False, 1, 1000, _NUMBER),
    0x50: ("timestamp", "s", 4, False, 1, 1, _NUMBER),  # unix seconds
    0x51: ("acceleration", "m/s2", 2, False, 1, 1000, _NUMBER),
    0x52: ("gyroscope", "deg/s", 2, False, 1, 1000, _NUMBER),
    0x53: ("text", "", 0, False, 1, 1, _SKIP),
    0x54: ("raw", "", 0, False, 1, 1, _SKIP),
    0x55: ("volume_storage", "l", 4, False, 1, 1000, _NUMBER),
    0x56: ("conductivity", "S/m", 2, False, 1, 10000, _NUMBER),  # uS/cm
    0x57: ("temperature", "Cel", 1, True, 1, 1, _NUMBER),
    0x58: ("temperature", "Cel", 1, True, 35, 100, _NUMBER),
    0x59: ("count", "/", 1, True, 1, 1, _NUMBER),
    0x5A: ("count", "/", 2, True, 1, 1, _NUMBER),
    0x5B: ("count", "/", 4, True, 1, 1, _NUMBER),
    0x5C: ("power", "W", 4, True, 1, 100, _NUMBER),
    0x5D: ("current", "A", 2, True, 1, 1000, _NUMBER),
    0x5E: ("direction", "deg", 2, False, 1, 100, _NUMBER),
    0x5F: ("precipitation", "m", 2, False, 1, 10000, _NUMBER),  # 0.1 mm
    0x60: ("channel", "/", 1, False, 1, 1, _NUMBER),
    0x61: ("rotational_speed", "1/min", 2, False, 1, 1, _NUMBER),
    0x62: ("speed", "m/s", 4, True, 1, 1000000, _NUMBER),
    0x63: ("acceleration", "m/s2", 4, True, 1, 1000000, _NUMBER),
    0x64: ("light_level", "/", 1, False, 1, 1, _NUMBER),
}

_DIMMER_NONE = 0
_DIMMER_LEFT = 1
_DIMMER_RIGHT = 2


class BTHomeError(ValueError):
    """The service data is not a BTHome v2 packet we can decode (the message says why)."""


class BTHomeEncrypted(BTHomeError):
    """The packet is encrypted: decoding it needs the device's key (and MAC)."""


# -- helpers ---------------------------------------------------------------------------


def object_ids() -> list[int]:
    """Every object id this codec knows, ascending."""
    return sorted(_OBJECTS)


def object_info(object_id: int) -> tuple[str, str, int, bool]:
    """(quantity, unit, size in bytes, signed) of a known object id; size 0 = length-prefixed."""
    entry = _OBJECTS.get(object_id)
    if entry is None:
        raise BTHomeError(f"unknown object id 0x{object_id:02x}")
    return entry[0], entry[1], entry[2], entry[3]


def _uint_le(data: bytes, start: int, size: int) -> int:
    value = 0
    for i in range(size - 1, -1, -1):
        value = (value << 8) | data[start + i]
    return value


def _put_le(out: bytearray, value: int, size: int) -> None:
    for _ in range(size):
        out.append(value & 0xFF)
        value >>= 8


def _header(data: bytes) -> tuple[int, int]:
    """Check the device information byte; return (info, offset of the first object)."""
    if len(data) == 0:
        raise BTHomeError("empty service data")
    info = data[0]
    version = info >> _VERSION_SHIFT
    if version != VERSION:
        raise BTHomeError(f"BTHome version {version} in device info 0x{info:02x}, expected 2")
    if info & INFO_ENCRYPTED:
        raise BTHomeEncrypted("encrypted BTHome packet: a key (and the device's MAC) is needed")
    start = 1
    if info & INFO_MAC_INCLUDED:
        start = 7
        if len(data) < start:
            raise BTHomeError(f"device info says a MAC is included but only {len(data)} bytes")
    return info, start


def _objects(data: bytes, start: int) -> list[tuple[int, int, int]]:
    """Split the objects from `start`: (object id, offset of the value, value length)."""
    found: list[tuple[int, int, int]] = []
    pos = start
    while pos < len(data):
        object_id = data[pos]
        entry = _OBJECTS.get(object_id)
        if entry is None:
            raise BTHomeError(
                f"unknown object id 0x{object_id:02x} at offset {pos}: the rest cannot be parsed"
            )
        size = entry[2]
        value_at = pos + 1
        if size == 0:  # text / raw: length byte first
            if value_at >= len(data):
                raise BTHomeError(f"object 0x{object_id:02x} at offset {pos} lacks its length")
            size = data[value_at]
            value_at += 1
        end = value_at + size
        if end > len(data):
            raise BTHomeError(
                f"object 0x{object_id:02x} at offset {pos} needs {size} bytes,"
                f" {len(data) - value_at} left"
            )
        found.append((object_id, value_at, size))
        pos = end
    return found


def _dimmer(event: int, steps: int) -> float | None:
    """Signed steps of a dimmer event: + right, - left, 0 none; None for an unknown event."""
    if event == _DIMMER_RIGHT:
        return float(steps)
    if event == _DIMMER_LEFT:
        return float(-steps)
    return 0.0 if event == _DIMMER_NONE else None


def _value(data: bytes, object_id: int, at: int, size: int) -> float | None:
    """The converted value of one object, or None for one that carries no measurement."""
    _name, _unit, _size, signed, mul, div, kind = _OBJECTS[object_id]
    if kind == _NUMBER:
        raw = _uint_le(data, at, size)
        if signed and raw >= 1 << (8 * size - 1):
            raw -= 1 << (8 * size)
        return raw * mul / div if (mul != 1 or div != 1) else float(raw)
    if kind == _BINARY:
        return 1.0 if data[at] else 0.0
    if kind == _DIMMER:
        return _dimmer(data[at], data[at + 1])
    return None  # packet id, text, raw


# -- decoding --------------------------------------------------------------------------


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode plaintext BTHome v2 service data into (quantity, unit, value) records.

    Records come in packet order; an object id that repeats (several sensors
    of one kind) gives one record each. The packet id, text and raw objects
    are not measurements and give none. Raises BTHomeEncrypted for an
    encrypted packet (decrypt it with `crypto.decrypt` first).
    """
    _info, start = _header(data)
    out: list[tuple[str, str, float]] = []
    for object_id, at, size in _objects(data, start):
        value = _value(data, object_id, at, size)
        if value is not None:
            entry = _OBJECTS[object_id]
            out.append((entry[0], entry[1], value))
    return out


def packet_id(data: bytes) -> int | None:
    """The packet id object's value (0..255) for deduplication, or None if there is none."""
    _info, start = _header(data)
    for object_id, at, _size in _objects(data, start):
        if object_id == OBJ_PACKET_ID:
            return data[at]
    return None


def is_encrypted(data: bytes) -> bool:
    """Whether the device information byte has the encryption flag (no other check)."""
    if len(data) == 0:
        raise BTHomeError("empty service data")
    return bool(data[0] & INFO_ENCRYPTED)


def is_trigger_based(data: bytes) -> bool:
    """Whether the device sends only on events (so silence does not mean it is gone)."""
    if len(data) == 0:
        raise BTHomeError("empty service data")
    return bool(data[0] & INFO_TRIGGER)


def mac_of(data: bytes) -> str | None:
    """The MAC a device put in its packet (device info bit 1), "AA:BB:..."; None if absent."""
    if len(data) == 0:
        raise BTHomeError("empty service data")
    if not data[0] & INFO_MAC_INCLUDED:
        return None
    if len(data) < 7:
        raise BTHomeError(f"device info says a MAC is included but only {len(data)} bytes")
    return ":".join([f"{data[i]:02X}" for i in range(6, 0, -1)])  # sent reversed


def from_advertisement(adv: bytes) -> bytes:
    """Cut the BTHome service data out of raw advertising data (a run of AD structures).

    Finds the 16-bit-UUID service data AD (type 0x16) for UUID 0xFCD2 and
    returns what follows the UUID, i.e. what bleak would deliver.
    """
    pos = 0
    while pos < len(adv):
        length = adv[pos]
        if length == 0:
            break  # early terminator: the rest is padding
        end = pos + 1 + length
        if end > len(adv):
            raise BTHomeError(f"AD structure at offset {pos} overruns the advertisement")
        if adv[pos + 1] == 0x16 and length >= 3:
            uuid = adv[pos + 2] | (adv[pos + 3] << 8)
            if uuid == SERVICE_UUID:
                return bytes(adv[pos + 4 : end])
        pos = end
    raise BTHomeError("no service data for UUID 0xFCD2 in the advertisement")


# -- encoding (the device's side, for emulators) ----------------------------------------


def _raw_of(object_id: int, value: float) -> int:
    name, _unit, size, signed, mul, div, kind = _OBJECTS[object_id]
    if not -1e18 < value < 1e18:  # also false for NaN
        raise BTHomeError(f"{name} value {value!r} cannot be encoded")
    if kind == _BINARY:
        return 1 if value else 0
    if kind == _DIMMER:
        steps = round(value)
        if steps > 0xFF or steps < -0xFF:
            raise BTHomeError(f"dimmer steps {steps} do not fit one byte")
        if steps > 0:
            return _DIMMER_RIGHT | (steps << 8)
        if steps < 0:
            return _DIMMER_LEFT | ((-steps) << 8)
        return _DIMMER_NONE
    raw = round(value * div / mul)
    bits = 8 * size
    low = -(1 << (bits - 1)) if signed else 0
    high = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if raw < low or raw > high:
        raise BTHomeError(f"{name} value {value!r} does not fit object 0x{object_id:02x}")
    return raw & ((1 << bits) - 1)


def encode(
    objects: list[tuple[int, float]], packet_id: int | None = None, trigger: bool = False
) -> bytes:
    """Build plaintext service data from (object id, value in our units) pairs.

    The inverse of `decode`: values are in the units `decode` reports (Pa,
    J, m ...). Objects are written in ascending id order (the order BTHome
    asks for; repeated ids keep their given order), after the packet id
    object when `packet_id` is given. Text, raw and packet id objects cannot
    be given as pairs.
    """
    info = VERSION << _VERSION_SHIFT
    if trigger:
        info |= INFO_TRIGGER
    out = bytearray([info])
    if packet_id is not None:
        if packet_id < 0 or packet_id > 0xFF:
            raise BTHomeError(f"packet id {packet_id} does not fit one byte")
        out.append(OBJ_PACKET_ID)
        out.append(packet_id)
    ordered = sorted(range(len(objects)), key=lambda i: (objects[i][0], i))
    for index in ordered:
        object_id, value = objects[index]
        entry = _OBJECTS.get(object_id)
        if entry is None:
            raise BTHomeError(f"unknown object id 0x{object_id:02x}")
        if entry[6] in (_SKIP, _PACKET):
            raise BTHomeError(f"object 0x{object_id:02x} carries no measurement to encode")
        out.append(object_id)
        _put_le(out, _raw_of(object_id, value), entry[2])
    return bytes(out)
