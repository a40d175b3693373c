"""Extra probes per family: command builders, encoders and value helpers worth cross-checking.

The ring probes `decode`, every public one-frame function and every stream
parser of a codec by itself (tests/micropython/ring.py); this module adds the
calls that need other arguments: command builders fed the vectors' `build`
fields, encoders fed decoded values, float and timing helpers fed edge
cases. A probe naming a function the codec does not have is dropped here, so
a renamed helper loses its probes rather than failing the ring; `decode` is
always required.

Trust: the vector files are trusted inputs; values are built with CPython's
struct where a codec itself must do without.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from tests.micropython import probe

VECTORS = Path(__file__).resolve().parent.parent / "vectors"

Probe = dict[str, object]


def call(function: str, *args: object, label: str = "") -> Probe:
    """A probe calling `function(*args)`."""
    shown = label or ", ".join(_short(a) for a in args)
    return {"id": f"{function}({shown})", "call": function, "args": [probe.encode(a) for a in args]}


def stream(cls: str, init: list[object], chunks: list[bytes], feed: str, label: str) -> Probe:
    """A probe building `cls(*init)` and calling its `feed` method on every chunk."""
    return {
        "id": f"{cls}({init}).{feed}({label})",
        "stream": cls,
        "init": [probe.encode(a) for a in init],
        "feed": feed,
        "chunks": [probe.encode(c) for c in chunks],
    }


def _short(value: object) -> str:
    text = value.hex() if isinstance(value, bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _vectors(*names: str) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for name in names:
        data = json.loads((VECTORS / name).read_text())
        entries += [e for e in data.get("vectors", []) if isinstance(e, dict)]
    return entries


def _hex(entry: dict[str, object]) -> bytes:
    return bytes.fromhex(str(entry.get("hex", "")))


def _build(entry: dict[str, object]) -> dict[str, object]:
    build = entry.get("build")
    return build if isinstance(build, dict) else {}


def _float32_bytes(values: list[float]) -> bytes:
    return b"".join(struct.pack(">f", v) for v in values)


# float32 values whose shortest decimal form is easy to get wrong
_AWKWARD_FLOATS = [
    0.0,
    -0.0,
    1.0,
    0.1,
    12.345678,
    1e-45,  # smallest subnormal
    1.17549435e-38,  # smallest normal
    3.4028235e38,  # largest
    16777216.0,
    16777217.0,
    0.30000001,
    123.456,
    999.99,
    1e-7,
    65504.0,
    2.5,
    0.5,
    7.0e-3,
    5.9604645e-8,
    33.333332,
]


def _pms5003(module: ModuleType) -> list[Probe]:
    probes: list[Probe] = []
    for entry in _vectors("plantower_pms5003.json"):
        expect = entry.get("expect")
        if entry.get("kind") == "command" and isinstance(expect, dict):
            probes.append(call("command", expect["cmd"], expect["data"]))
            probes.append(call("ack_frame", expect["cmd"], expect["data"]))
    probes += [call("command", 0x100, 0), call("command", 0xE1, 0x10000)]
    words = [[i * 37 % 0x10000 for i in range(13)], [0] * 13, [0xFFFF] * 13, [1] * 12]
    probes += [call("encode_frame", w) for w in words]
    probes += [call("encode_frame", words[0], 1), call("encode_frame", [0x10000] + [0] * 12)]
    stream_bytes = b"".join(_hex(e) for e in _vectors("plantower_pms5003.json"))
    probes.append(stream("StreamParser", [], [stream_bytes], "feed_frames", "all vectors"))
    return probes


def _maxbotix(module: ModuleType) -> list[Probe]:
    models = ["auto", "hrxl", "hrxl_10m", "xl", "lv", "sonar"]
    raw = [_hex(e) for e in _vectors("maxbotix_mb7xxx.json")]
    probes: list[Probe] = [call("decode_model", data, model) for data in raw for model in models]
    values = [0, 1, 7, 254, 255, 256, 300, 765, 1068, 1069, 4999, 5000, 9998, 9999]
    for model in models:
        probes += [call("records", v, d, model) for v in values for d in (3, 4)]
        every = b"".join(raw)
        probes.append(stream("StreamParser", [model], [every], "feed", "all vectors"))
        chunks = [every[i : i + 1] for i in range(len(every))]
        probes.append(stream("StreamParser", [model], chunks, "feed", "byte by byte"))
    probes += [call("frame_for", v, d) for v in (0, 7, 765, 4999, 12345) for d in (3, 4)]
    return probes


def _a02yyuw(module: ModuleType) -> list[Probe]:
    models = ["a02yyuw", "jsn_sr04t", "sonar"]
    raw = [_hex(e) for e in _vectors("dfrobot_a02yyuw.json", "jsn_sr04t.json")]
    probes: list[Probe] = [call("decode_model", data, model) for data in raw for model in models]
    values = [0, 1, 30, 31, 199, 200, 511, 1953, 4500, 4501, 6000, 6001, 0xFFFF, 0x10000, -1]
    probes += [call("classify", mm, model) for mm in values for model in models]
    probes += [call("encode", mm, delta) for mm in values for delta in (0, 1)]
    probes += [call("checksum", 0xFF, high, low) for high, low in ((7, 0xA1), (1, 0xFF), (0, 0))]
    every = b"".join(raw)
    chunks = [every[i : i + 1] for i in range(len(every))]
    for model in models:
        probes.append(stream("StreamParser", [model], [every], "feed", "all vectors"))
        probes.append(stream("StreamParser", [model], chunks, "feed", "byte by byte"))
    return probes


def _sds011(module: ModuleType) -> list[Probe]:
    probes: list[Probe] = []
    for entry in _vectors("nova_sds011.json"):
        build = _build(entry)
        if build:
            data = bytes.fromhex(str(build["data"]))
            probes.append(call("command", build["sub"], data, build["id"]))
        raw = _hex(entry)
        if len(raw) == 10:
            payload = raw[2:8]
            probes += [call(f, payload) for f in ("measurement", "reply_fields", "describe_reply")]
            probes += [call("answers", sub, raw[1], payload) for sub in (2, 4, 5, 6, 7, 8)]
    for device in (0xFFFF, 0xA160, 0, 0x10000):
        probes += [call("set_mode", q, device) for q in (True, False)]
        probes += [call("set_working", w, device) for w in (True, False)]
        probes += [call("set_period", m, device) for m in (0, 1, 30, 31, -1)]
        probes += [call("query_data", device)]
        probes += [call("get_setting", sub, device) for sub in (2, 6, 7, 8)]
    probes += [call("command", 2, bytes(13)), call("command", 256), call("command", -1)]
    probes += [
        call("data_frame", pm25, pm10, 0xA160, delta)
        for pm25, pm10 in ((0, 0), (1236, 2618), (9999, 19999), (65535, 65535), (65536, 0))
        for delta in (0, 1)
    ]
    probes += [call("reply_frame", 6, 1, 0, 0, 0xA160), call("reply_frame", 7, 15, 7, 10, 0xFFFF)]
    return probes


def _sps30(module: ModuleType) -> list[Probe]:
    probes: list[Probe] = []
    vectors = _vectors("sensirion_sps30.json")
    for entry in vectors:
        build = _build(entry)
        if build:
            probes.append(call("mosi_frame", build["cmd"], bytes.fromhex(str(build["data"]))))
    probes.append(call("mosi_frame", 0, bytes(256)))
    values = _float32_bytes(_AWKWARD_FLOATS[:10])
    more = _float32_bytes(_AWKWARD_FLOATS[10:])
    uint16 = b"".join(struct.pack(">H", v) for v in (0, 1, 999, 1000, 65535, 7, 13, 4242, 2, 1500))
    special = _float32_bytes([float("nan")] + [1.0] * 9)
    for data in (values, more, uint16, special, b"", b"\x01\x02\x03"):
        probes.append(call("measured_values", data))
        for state in (0, 0x43, 0x80):
            frame = call("miso_frame", 3, state, data)
            probes.append(frame)
            wire = _miso_frame(3, state, data)
            probes.append(call("decode", wire, label=f"miso_frame(3, {state}, {len(data)} bytes)"))
    probes += [call("state_text", s) for s in (0, 1, 2, 3, 4, 0x28, 0x43, 0x80, 0xC3, 0xFF)]
    probes += [call("status_text", r) for r in (0, 1 << 21, 1 << 5, 1 << 4, 0x00200030)]
    probes += [call("status_register", d) for d in (b"\x00\x20\x00\x30\x00", b"\x01")]
    probes += [call("info_text", d) for d in (b"SPS30\x00\x00", b"\x7f\x80abc", b"")]
    all_bytes = b"".join(_hex(e) for e in vectors)
    probes.append(stream("StreamParser", [False], [all_bytes], "feed", "all vectors, mosi"))
    chunks = [all_bytes[i : i + 1] for i in range(len(all_bytes))]
    probes.append(stream("StreamParser", [False], chunks, "feed", "byte by byte, mosi"))
    return probes


def _miso_frame(cmd: int, state: int, data: bytes) -> bytes:
    """An SHDLC reply built here (not by the codec), so decode is checked on its own."""
    raw = bytes([0, cmd, state, len(data)]) + data
    body = raw + bytes([0xFF - (sum(raw) & 0xFF)])
    stuffed = bytearray()
    for byte in body:
        if byte in (0x7E, 0x7D, 0x11, 0x13):
            stuffed += bytes([0x7D, byte ^ 0x20])
        else:
            stuffed.append(byte)
    return b"\x7e" + bytes(stuffed) + b"\x7e"


def _ruuvi(module: ModuleType) -> list[Probe]:
    probes: list[Probe] = [call("lux_of_code", code) for code in range(256)]
    lux_values = [0.0, 0.04, 1.0, 1.01, 244.06, 266.43, 13026.67, 65535.0, 70000.0, -1.0]
    probes += [call("code_of_lux", lux) for lux in lux_values]
    decode = getattr(module, "decode", None)
    for index, entry in enumerate(_vectors("ruuvi_df5.json", "ruuvi_df6.json")):
        raw = _hex(entry)
        try:
            records = decode(raw) if callable(decode) else []
        except ValueError:
            continue
        values = {name: value for name, _unit, value in records}
        probes.append(call("encode_df5", values, index, "CB:B8:33:4C:88:4F"))
        probes.append(call("encode_df6", values, index, "CB:B8:33:4C:88:4F"))
        probes.append(call("encode_df6", values, 300 + index, None))
    probes.append(
        call("encode_df5", {"temperature": 1e9, "humidity": -5.0}, 1, "00:11:22:33:44:55")
    )
    probes.append(call("encode_df5", {}, 70000, "00:11:22:33:44:55"))
    probes.append(call("encode_df5", {}, 1, "not a mac"))
    return probes


def _bthome(module: ModuleType) -> list[Probe]:
    probes: list[Probe] = [call("object_ids")]
    probes += [call("object_info", object_id) for object_id in range(256)]
    ids = module.object_ids() if callable(getattr(module, "object_ids", None)) else []
    for object_id in ids:
        for value in (0.0, 1.0, 12.345, -5.5, 2.5, 1e12):
            probes.append(call("encode", [(object_id, value)]))
    probes.append(call("encode", [(0x02, 21.5), (0x01, 87.0), (0x03, 45.25)], 7, False))
    probes.append(call("encode", [(0x02, 21.5)], 256))
    probes.append(call("encode", [(0x02, float("nan"))]))
    return probes


def _modbus(module: ModuleType) -> list[Probe]:
    files = (
        "eastron_sdm120.json",
        "eastron_sdm630.json",
        "senseair_s8.json",
        "dfrobot_urm13_modbus.json",
    )
    bits = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 1, 0x007FFFFF, 0x00800000]
    bits += [0x7F7FFFFF, 0x3F800000, 0x43668000, 0x43708000, 0xC2F6E979, 0x4247EB85]
    registers: list[list[int]] = []
    decode = getattr(module, "decode", None)
    for entry in _vectors(*files):
        raw = _hex(entry)
        if entry.get("kind") == "float" and len(raw) == 4:
            bits.append(int.from_bytes(raw, "big"))
        try:
            records = decode(raw) if callable(decode) else []
        except ValueError:
            continue
        regs = [int(v) for n, _u, v in records if n.startswith("register_")]
        if regs:
            registers.append(regs)
    probes: list[Probe] = [call("float32_from_bits", b) for b in bits]
    probes += [call("is_finite", v) for v in (0.0, float("inf"), float("-inf"), float("nan"))]
    for order in ("ABCD", "CDAB", "BADC", "DCBA", "XYZW"):
        probes += [call("combine32", 0x4366, 0x3334, order), call("split32", 0x43663334, order)]
        for regs in registers:
            for kind in ("int16", "uint16", "int32", "uint32", "float32", "bool"):
                probes += [call("field_raw", regs, off, kind, order) for off in range(len(regs))]
    for regs in registers:
        fields = [
            ("a", "V", 0, "float32", "ABCD", 1.0, 0.0),
            ("b", "W", 1, "int16", "ABCD", 0.1, -40.0),
            ("c", "J", 2, "uint32", "CDAB", 3.6e6, 0.0),
        ]
        probes.append(call("decode_fields", fields, 0, regs))
    probes += [call("exception_text", code) for code in range(13)]
    for timing in json.loads((VECTORS / "modbus_rtu_common.json").read_text())["timing_vectors"]:
        baud, bits_per_char = timing["baud"], timing["bits_per_char"]
        for function in ("char_time_s", "silent_interval_s", "inter_char_limit_s"):
            probes.append(call(function, baud, bits_per_char))
    probes += [call("read_reply_len", n) for n in (0, 1, 125)]
    probes += [
        call("read_request", 1, 4, 0, 2),
        call("read_request", 0xFE, 4, 3, 1),
        call("read_request", 248, 4, 0, 2),
        call("read_reply", 1, 4, [0x4366, 0x3334]),
        call("write_single_request", 0xFE, 0, 0x7C06),
        call("exception_reply", 1, 4, 2),
        call("tcp_adu", 1, 1, b"\x04\x00\x00\x00\x02"),
    ]
    plan = [(4, 0, 2), (4, 6, 2), (4, 12, 2), (4, 70, 2), (4, 72, 2), (3, 0, 1), (4, 0x156, 2)]
    for max_registers in (1, 4, 40, 125, 126):
        for gap in (0, 4, 100):
            probes.append(call("plan_reads", plan, max_registers, {4: gap, 3: gap}, []))
    probes.append(call("plan_reads", plan, 125, {4: 100}, [(4, 20, 30)]))
    probes.append(call("plan_reads", [(6, 0, 1)], 125, {}, []))
    return probes


EXTRAS: dict[str, Callable[[ModuleType], list[Probe]]] = {
    "pms5003": _pms5003,
    "maxbotix": _maxbotix,
    "a02yyuw": _a02yyuw,
    "sds011": _sds011,
    "sps30": _sps30,
    "ruuvi": _ruuvi,
    "bthome": _bthome,
    "modbus": _modbus,
}


def probes_for(family: str, module: ModuleType) -> list[Probe]:
    """The extra probes of one family, keeping only those whose callable the codec has."""
    build = EXTRAS.get(family)
    if build is None:
        return []
    return [
        p
        for p in build(module)
        if callable(getattr(module, str(p.get("stream") or p.get("call")), None))
    ]
