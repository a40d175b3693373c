"""Run codec probes and compare outcomes; the same file runs under CPython and MicroPython.

A probe is a JSON object naming one call into a codec module: `decode` (or
any function) with encoded arguments, or a stream parser class fed a list of
chunks. `run_probes` returns one encoded outcome per probe: the encoded return
value, or the class of the exception raised. `compare` says where two lists of
outcomes differ, floats within a tight relative tolerance.

Values cross the interpreter boundary as JSON that both sides read the same
way: floats travel as the hex of their IEEE-754 bits (MicroPython formats and
parses decimal floats differently from CPython), bytes as hex, tuples, dicts
and objects as tagged lists.

Trust: the codecs are the code under test and may raise anything; nothing a
codec does escapes a probe. This file imports only json and struct (present in
both interpreters), has no `from __future__` and builtin annotations only, so
MicroPython can compile it.
"""

import json
import struct

REL_TOL = 1e-9  # floats this close count as equal: libm and literal parsing differ by ulps
ABS_TOL = 1e-12  # ... and near zero, an absolute floor
MAX_DEPTH = 8  # nested values deeper than this are summarised, not encoded


def encode(value: object, depth: int = 0) -> object:
    """Turn a value into JSON-safe data that both interpreters encode identically."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"f": struct.pack(">d", value).hex()}
    if isinstance(value, bytes):
        return {"b": value.hex()}
    if isinstance(value, bytearray):
        return {"ba": bytes(value).hex()}
    if depth >= MAX_DEPTH:
        return {"deep": type(value).__name__}
    if isinstance(value, list):
        return [encode(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return {"t": [encode(item, depth + 1) for item in value]}
    if isinstance(value, dict):
        items = [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]
        return {"d": sorted(items, key=json.dumps)}  # MicroPython dicts are unordered
    if isinstance(value, (set, frozenset)):
        return {"s": sorted([encode(item, depth + 1) for item in value], key=json.dumps)}
    return {"o": type(value).__name__, "a": _attributes(value, depth)}


def _attributes(value: object, depth: int) -> list[list[object]]:
    """Public, non-callable attributes of an object (counters, properties), by name."""
    out: list[list[object]] = []
    for name in sorted(dir(value)):
        if name.startswith("_"):
            continue
        try:
            attr = getattr(value, name)
        except Exception as exc:  # a property that raises is part of the behaviour
            out.append([name, {"raised": type(exc).__name__}])
            continue
        if not callable(attr):
            out.append([name, encode(attr, depth + 1)])
    return out


def decode_arg(data: object) -> object:
    """Inverse of `encode` for the argument shapes probes use."""
    if isinstance(data, list):
        return [decode_arg(item) for item in data]
    if isinstance(data, dict):
        if "f" in data:
            return float(struct.unpack(">d", bytes.fromhex(str(data["f"])))[0])
        if "b" in data:
            return bytes.fromhex(str(data["b"]))
        if "ba" in data:
            return bytearray(bytes.fromhex(str(data["ba"])))
        items = data.get("t", data.get("d", data.get("s")))
        values = [decode_arg(item) for item in items] if isinstance(items, list) else []
        if "t" in data:
            return tuple(values)
        if "s" in data:
            return set(values)
        if "d" in data:
            return {pair[0]: pair[1] for pair in values if isinstance(pair, list)}
    return data


def _raised(exc: BaseException) -> dict[str, object]:
    return {
        "raised": type(exc).__name__,
        "value_error": isinstance(exc, ValueError),
        "message": str(exc),
    }


def _args(probe: dict[str, object], key: str) -> list[object]:
    raw = decode_arg(probe.get(key, []))
    return raw if isinstance(raw, list) else [raw]


def run_probe(module: object, probe: dict[str, object]) -> dict[str, object]:
    """Run one probe against a loaded codec module and encode what happened."""
    name = str(probe.get("stream") or probe.get("call"))
    target = getattr(module, name, None)
    if target is None or not callable(target):
        return {"missing": name}
    try:
        if "stream" in probe:
            parser = target(*_args(probe, "init"))
            feed = getattr(parser, str(probe.get("feed", "feed")))
            results = [encode(feed(chunk)) for chunk in _args(probe, "chunks")]
            return {"ok": {"feeds": results, "state": encode(parser)}}
        return {"ok": encode(target(*_args(probe, "args")))}
    except Exception as exc:  # the outcome under test, whatever it is
        return _raised(exc)


def run_probes(module: object, probes: list[dict[str, object]]) -> list[dict[str, object]]:
    """Run every probe in order; one outcome each."""
    return [run_probe(module, probe) for probe in probes]


def _float_of(data: object) -> float | None:
    if isinstance(data, dict) and len(data) == 1 and "f" in data:
        return float(struct.unpack(">d", bytes.fromhex(str(data["f"])))[0])
    return None


def close(a: float, b: float) -> bool:
    """Equal floats, both NaN, or within REL_TOL (ABS_TOL near zero)."""
    if a == b or (a != a and b != b):  # NaN is the only value unequal to itself
        return True
    return abs(a - b) <= max(REL_TOL * max(abs(a), abs(b)), ABS_TOL)


def same(a: object, b: object) -> bool:
    """Structural equality of two encoded values, floats within the tolerance."""
    fa = _float_of(a)
    fb = _float_of(b)
    if fa is not None or fb is not None:
        return fa is not None and fb is not None and close(fa, fb)
    if isinstance(a, list) and isinstance(b, list):
        # (no zip: ruff wants strict=, which MicroPython's zip does not take)
        return len(a) == len(b) and all(same(a[i], b[i]) for i in range(len(a)))
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def same_outcome(a: dict[str, object], b: dict[str, object]) -> bool:
    """Same value, or an exception of the same class (messages may be worded differently)."""
    if "ok" in a and "ok" in b:
        return same(a["ok"], b["ok"])
    if "raised" in a and "raised" in b:
        return a["raised"] == b["raised"] and a.get("value_error") == b.get("value_error")
    return "missing" in a and "missing" in b and a["missing"] == b["missing"]


def show(data: object) -> str:
    """A short readable form of an encoded value, for failure messages."""
    value = _float_of(data)
    if value is not None:
        return repr(value)
    if isinstance(data, list):
        return "[" + ", ".join(show(item) for item in data) + "]"
    if isinstance(data, dict):
        if "t" in data and isinstance(data["t"], list):
            return "(" + ", ".join(show(item) for item in data["t"]) + ")"
        if "b" in data:
            return "b'" + str(data["b"]) + "'"
        return "{" + ", ".join(str(k) + ": " + show(v) for k, v in sorted(data.items())) + "}"
    return repr(data)


def show_outcome(outcome: dict[str, object]) -> str:
    """`-> value` or `raised Class('message')`, trimmed for a one-line report."""
    if "ok" in outcome:
        text = "-> " + show(outcome["ok"])
    elif "raised" in outcome:
        text = "raised " + str(outcome["raised"]) + "(" + repr(outcome.get("message", "")) + ")"
    else:
        text = "no callable " + repr(outcome.get("missing"))
    return text if len(text) <= 300 else text[:297] + "..."


def compare(
    probes: list[dict[str, object]],
    expected: list[dict[str, object]],
    actual: list[dict[str, object]],
) -> list[str]:
    """One line per probe whose outcomes differ (expected = CPython, actual = MicroPython)."""
    if not len(probes) == len(expected) == len(actual):
        counts = f"{len(probes)} probes, {len(expected)} outcomes under CPython"
        return [counts + f", {len(actual)} under MicroPython"]
    lines: list[str] = []
    for index, probe in enumerate(probes):
        want = expected[index]
        got = actual[index]
        if not same_outcome(want, got):
            lines.append(
                f"{probe.get('id')}: CPython {show_outcome(want)}; MicroPython {show_outcome(got)}"
            )
    return lines


def main(job_text: str) -> str:
    """MicroPython entry point: run the job's families, compare, return a JSON report.

    The job maps family -> {"module", "probes", "expected"}; the module was
    written where `__import__` finds it. The report maps family -> {"error"}
    (the codec could not be imported) or {"mismatches", "outcomes"}.
    """
    job = json.loads(job_text)
    report: dict[str, object] = {}
    for family, spec in sorted(job["families"].items()):
        try:
            module = __import__(spec["module"])
        except Exception as exc:  # a codec MicroPython cannot load is the finding
            report[family] = {"error": "import failed: " + type(exc).__name__ + ": " + str(exc)}
            continue
        probes = spec["probes"]
        outcomes = run_probes(module, probes)
        report[family] = {
            "mismatches": compare(probes, spec["expected"], outcomes),
            "outcomes": outcomes,
        }
    return json.dumps(report)
