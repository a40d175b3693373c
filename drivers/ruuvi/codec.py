"""Ruuvi BLE advertisement payloads: RuuviTag data format 5 (RAWv2) and Ruuvi Air format 6.

Pure functions of bytes. Nothing is imported, so the same file runs under
CPython and MicroPython (builtin types only, no `from __future__`, byte math
instead of `struct`).

Input is the manufacturer data as bleak delivers it: the bytes after the
company id 0x0499, starting with the data-format byte. `from_advertisement`
cuts that payload out of raw advertising data (AD structures) for tools that
see whole adverts.

Trust: every byte is unverified radio input. A payload is accepted only when
its format byte is known and its length is exactly that format's length;
there is no checksum, so the values are what the tag says. Fields holding
their "not available" code are omitted, never published as numbers.

Layouts (SENSORS.md 4.1 and 4.2, docs.ruuvi.com), all big-endian:

DF5, 24 bytes: fmt | temp int16 x0.005 C | humidity uint16 x0.0025 % |
pressure uint16 +50000 Pa | acc x/y/z int16 mG | power: battery 11 bits
(+1600 mV), tx 5 bits (x2 -40 dBm) | movement uint8 | sequence uint16 | MAC 6.

DF6, 20 bytes: fmt | temp | humidity | pressure (as DF5) | PM2.5 uint16 x0.1 |
CO2 uint16 ppm | VOC bits 8..1 | NOx bits 8..1 | luminosity log code |
reserved (firmware: sound) | sequence uint8 | flags (b0 calibration, b6 VOC
bit 0, b7 NOx bit 0) | low 3 bytes of the MAC.
"""

COMPANY_ID = 0x0499
DF5 = 5
DF6 = 6
DF5_LEN = 24
DF6_LEN = 20

# standard gravity: accelerations arrive in milli-g, we publish m/s2 (1 mG = 9.80665e-3 m/s2)
_G = 9.80665
_MILLI_G_NUM = 980665
_MILLI_G_DEN = 100000000

# luminosity code c means lux = 65536 ** (c / 254) - 1 (docs: exp(c * ln(65536) / 254) - 1)
_LUX_CODE_MAX = 254
_LUX_INVALID = 0xFF

_DF6_FLAG_CALIBRATION = 0x01
_DF6_FLAG_VOC_LSB = 0x40
_DF6_FLAG_NOX_LSB = 0x80
# reserved byte 14 and its flag bit 4 hold the firmware's sound level; we write "invalid"
_DF6_SOUND_INVALID_BYTE = 0xFF
_DF6_FLAG_SOUND_LSB = 0x10


class RuuviError(ValueError):
    """The payload is not a Ruuvi advertisement we can decode (the message says why)."""


# -- byte helpers ------------------------------------------------------------------------


def _u16(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _s16(data: bytes, offset: int) -> int:
    value = _u16(data, offset)
    return value - 0x10000 if value & 0x8000 else value


def _put16(out: bytearray, value: int) -> None:
    value &= 0xFFFF
    out.append(value >> 8)
    out.append(value & 0xFF)


def _clip(value: int, low: int, high: int) -> int:
    if value < low:
        return low
    if value > high:
        return high
    return value


def _hex_pairs(raw: bytes) -> str:
    return ":".join([f"{b:02X}" for b in raw])


def _parse_mac(mac: str, size: int) -> bytes:
    """Parse "AA:BB:CC:DD:EE:FF" (':' or '-' or nothing between pairs) into `size` bytes."""
    text = mac.replace(":", "").replace("-", "")
    if len(text) != 2 * size:
        raise RuuviError(f"mac {mac!r} does not have {size} bytes")
    try:
        return bytes([int(text[i : i + 2], 16) for i in range(0, 2 * size, 2)])
    except ValueError:
        raise RuuviError(f"mac {mac!r} is not hexadecimal") from None


def _check(data: bytes) -> int:
    """Return the data format of a payload whose length matches it; RuuviError otherwise."""
    if len(data) == 0:
        raise RuuviError("empty payload")
    fmt = data[0]
    if fmt == DF5:
        expected = DF5_LEN
    elif fmt == DF6:
        expected = DF6_LEN
    else:
        raise RuuviError(f"unsupported data format 0x{fmt:02x} (5 and 6 are decoded)")
    if len(data) != expected:
        raise RuuviError(f"data format {fmt} payload is {len(data)} bytes, expected {expected}")
    return fmt


# -- shared environmental fields (bytes 1-6 of both formats) --------------------------------


def _environment(data: bytes, out: list[tuple[str, str, float]]) -> None:
    raw = _u16(data, 1)
    if raw != 0x8000:
        out.append(("temperature", "Cel", _s16(data, 1) / 200))
    raw = _u16(data, 3)
    if raw != 0xFFFF:
        out.append(("humidity", "%RH", raw / 400))
    raw = _u16(data, 5)
    if raw != 0xFFFF:
        out.append(("pressure", "Pa", float(raw + 50000)))


def _scaled(values: dict[str, float], name: str, scale: float, low: int, high: int) -> int | None:
    """round(value * scale) clipped to [low, high]; None if `name` is missing."""
    value = values.get(name)
    if value is None:
        return None
    if not -1e12 < value < 1e12:  # also false for NaN
        raise RuuviError(f"{name} value {value!r} cannot be encoded")
    return _clip(round(value * scale), low, high)


def _or(value: int | None, invalid: int) -> int:
    return invalid if value is None else value


def _put_environment(out: bytearray, values: dict[str, float]) -> None:
    _put16(out, _or(_scaled(values, "temperature", 200, -32767, 32767), 0x8000))
    _put16(out, _or(_scaled(values, "humidity", 400, 0, 0xFFFE), 0xFFFF))
    pressure = _scaled(values, "pressure", 1, 50000, 50000 + 0xFFFE)
    _put16(out, 0xFFFF if pressure is None else pressure - 50000)


# -- luminosity (DF6) --------------------------------------------------------------------


def lux_of_code(code: int) -> float:
    """Illuminance in lx for a DF6 luminosity code 0..254, rounded to 0.01 lx."""
    factor: float = 2.0 ** (16 * code / _LUX_CODE_MAX)
    # round half up to 0.01 by hand: MicroPython's round(x, 2) differs from CPython's
    return int((factor - 1.0) * 100 + 0.5) / 100


def code_of_lux(lux: float) -> int:
    """The DF6 luminosity code nearest (on the log scale the format uses) to `lux`."""
    target = lux + 1.0
    low = 0
    high = _LUX_CODE_MAX
    # smallest code whose upper boundary (geometric midpoint to the next code) is above target
    while low < high:
        mid = (low + high) // 2
        if 2.0 ** (16 * (mid + 0.5) / _LUX_CODE_MAX) > target:
            high = mid
        else:
            low = mid + 1
    return low


# -- decoding ----------------------------------------------------------------------------


def _decode_df5(data: bytes) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = []
    _environment(data, out)
    for name, offset in (("acceleration_x", 7), ("acceleration_y", 9), ("acceleration_z", 11)):
        if _u16(data, offset) != 0x8000:
            # one exact integer product, one division: the same float on every platform
            out.append((name, "m/s2", _s16(data, offset) * _MILLI_G_NUM / _MILLI_G_DEN))
    power = _u16(data, 13)
    battery = power >> 5
    if battery != 0x7FF:
        out.append(("battery", "V", (battery + 1600) / 1000))
    tx = power & 0x1F
    if tx != 0x1F:
        out.append(("tx_power", "dBm", float(tx * 2 - 40)))
    if data[15] != 0xFF:
        out.append(("movement_count", "/", float(data[15])))
    return out


def _decode_df6(data: bytes) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = []
    _environment(data, out)
    raw = _u16(data, 7)
    if raw != 0xFFFF:
        out.append(("pm2_5", "ug/m3", raw / 10))
    raw = _u16(data, 9)
    if raw != 0xFFFF:
        out.append(("co2", "ppm", float(raw)))
    flags = data[16]
    voc = (data[11] << 1) | (1 if flags & _DF6_FLAG_VOC_LSB else 0)
    if voc != 0x1FF:
        out.append(("voc_index", "/", float(voc)))
    nox = (data[12] << 1) | (1 if flags & _DF6_FLAG_NOX_LSB else 0)
    if nox != 0x1FF:
        out.append(("nox_index", "/", float(nox)))
    if data[13] != _LUX_INVALID:
        out.append(("illuminance", "lx", lux_of_code(data[13])))
    return out


def decode(data: bytes) -> list[tuple[str, str, float]]:
    """Decode one DF5 or DF6 payload into (quantity, unit, value) records.

    Quantities whose field holds the format's "not available" code are left
    out, so a valid payload may give fewer records (or none at all).
    """
    if _check(data) == DF5:
        return _decode_df5(data)
    return _decode_df6(data)


def data_format(data: bytes) -> int:
    """The data format (5 or 6) of a well-formed payload; RuuviError otherwise."""
    return _check(data)


def measurement_sequence(data: bytes) -> int | None:
    """The tag's measurement counter, for dropping repeated adverts of one measurement.

    DF5: 16 bits, None when 65535 ("not available"). DF6: the low 8 bits of
    the air monitor's counter (no invalid code).
    """
    if _check(data) == DF5:
        seq = _u16(data, 16)
        return None if seq == 0xFFFF else seq
    return data[15]


def mac_of(data: bytes) -> str | None:
    """The MAC address embedded in the payload, upper case, or None if it says "not available".

    DF5 carries all six bytes ("CB:B8:33:4C:88:4F"); DF6 only the low three
    ("4C:88:4F"), which is what is returned for it.
    """
    raw = data[18:24] if _check(data) == DF5 else data[17:20]
    if raw == b"\xff" * len(raw):
        return None
    return _hex_pairs(raw)


def calibration_in_progress(data: bytes) -> bool:
    """DF6 flag bit 0: the air monitor is calibrating. Always False for DF5."""
    if _check(data) == DF5:
        return False
    return bool(data[16] & _DF6_FLAG_CALIBRATION)


def from_advertisement(adv: bytes) -> bytes:
    """Cut the Ruuvi payload out of raw advertising data (a run of AD structures).

    Finds the manufacturer-specific AD (type 0xFF) with company id 0x0499 and
    returns what follows the id, i.e. what bleak would deliver.
    """
    pos = 0
    while pos < len(adv):
        length = adv[pos]
        if length == 0:
            break  # early terminator: the rest is padding
        end = pos + 1 + length
        if end > len(adv):
            raise RuuviError(f"AD structure at offset {pos} overruns the advertisement")
        if adv[pos + 1] == 0xFF and length >= 3:
            company = adv[pos + 2] | (adv[pos + 3] << 8)
            if company == COMPANY_ID:
                return bytes(adv[pos + 4 : end])
        pos = end
    raise RuuviError("no manufacturer data with company id 0x0499 in the advertisement")


# -- encoding (the tag's side, for emulators) ----------------------------------------------


def encode_df5(values: dict[str, float], sequence: int, mac: str, movement: int = 0) -> bytes:
    """Build a DF5 payload from values keyed by our quantity names (the inverse of `decode`).

    Missing quantities are sent as their "not available" code; values outside
    a field's range are clipped like the tag's firmware does. `movement` 255
    and `sequence` 65535 mean "not available".
    """
    if sequence < 0 or sequence > 0xFFFF:
        raise RuuviError(f"sequence {sequence} does not fit 16 bits")
    if movement < 0 or movement > 0xFF:
        raise RuuviError(f"movement counter {movement} does not fit 8 bits")
    out = bytearray([DF5])
    _put_environment(out, values)
    for name in ("acceleration_x", "acceleration_y", "acceleration_z"):
        _put16(out, _or(_scaled(values, name, 1000 / _G, -32767, 32767), 0x8000))
    battery = _scaled(values, "battery", 1000, 1600, 1600 + 0x7FE)
    battery = 0x7FF if battery is None else battery - 1600
    tx = _scaled(values, "tx_power", 0.5, -20, 10)
    tx = 0x1F if tx is None else tx + 20
    _put16(out, (battery << 5) | tx)
    out.append(movement)
    _put16(out, sequence)
    return bytes(out) + _parse_mac(mac, 6)


def encode_df6(values: dict[str, float], sequence: int, mac: str | None = None) -> bytes:
    """Build a DF6 payload from values keyed by our quantity names (the inverse of `decode`).

    Missing quantities are sent as "not available"; `sequence` is reduced to
    its low 8 bits; `mac` may be the full address (its low three bytes are
    sent) or just those three; None sends FF FF FF. The reserved/sound field
    is sent as "not available" and no flag other than the VOC/NOx bits is set.
    """
    out = bytearray([DF6])
    _put_environment(out, values)
    _put16(out, _or(_scaled(values, "pm2_5", 10, 0, 0xFFFE), 0xFFFF))
    _put16(out, _or(_scaled(values, "co2", 1, 0, 0xFFFE), 0xFFFF))
    voc = _or(_scaled(values, "voc_index", 1, 0, 0x1FE), 0x1FF)
    nox = _or(_scaled(values, "nox_index", 1, 0, 0x1FE), 0x1FF)
    out.append(voc >> 1)
    out.append(nox >> 1)
    lux = _scaled(values, "illuminance", 1, 0, 0x7FFFFFFF)  # checks the value is finite
    out.append(_LUX_INVALID if lux is None else code_of_lux(values["illuminance"]))
    out.append(_DF6_SOUND_INVALID_BYTE)
    out.append(sequence & 0xFF)
    flags = _DF6_FLAG_SOUND_LSB
    if voc & 1:
        flags |= _DF6_FLAG_VOC_LSB
    if nox & 1:
        flags |= _DF6_FLAG_NOX_LSB
    out.append(flags)
    if mac is None:
        return bytes(out) + b"\xff\xff\xff"
    text = mac.replace(":", "").replace("-", "")
    size = 3 if len(text) == 6 else 6
    return bytes(out) + _parse_mac(mac, size)[-3:]
