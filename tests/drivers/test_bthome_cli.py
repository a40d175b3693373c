"""`citygate decode bthome`: every BTHome v2 vector through the real command line, encrypted
ones with --mac and --key.

The vector file names objects descriptively (temperature_c, count_u16 ...);
the map below turns them into our quantity names. The vector file's one
encrypted vector is the wrong-key case; the two documented good encrypted
packets (bthome.io / bthome-ble tests, SENSORS.md §4.3) are added here so
that decryption through the command line is shown to work too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors" / "bthome_v2.json"
FIELDS = {
    "temperature_c": ("temperature", "Cel"),
    "humidity_pct": ("humidity", "%RH"),
    "count_u16": ("count", "/"),
    "count_u32": ("count", "/"),
    "motion": ("motion", "/"),
}
DOC_MAC = "54:48:E6:8F:80:A5"
DOC_KEY = "231d39c1d7cc1ab1aee224cd096db932"
DOCUMENTED_ENCRYPTED: list[dict[str, Any]] = [
    {
        "id": "doc_encrypted_climate",
        "hex": "41 A4 72 66 C9 5F 73 00 11 22 33 78 23 72 14",
        "mac": DOC_MAC,
        "key": DOC_KEY,
        "expect": {"objects": [["temperature_c", 25.06], ["humidity_pct", 50.55]]},
    },
    {
        "id": "doc_encrypted_motion",
        "hex": "41 87 B9 00 11 22 33 72 B0 23 1F",
        "mac": DOC_MAC,
        "key": DOC_KEY,
        "expect": {"objects": [["motion", 1]]},
    },
]


def _vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS.read_text())["vectors"]
    return vectors


def _decode(*args: str) -> tuple[list[dict[str, Any]], int]:
    result = citygate("decode", "bthome", *args)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines, result.stderr
    return lines, result.returncode


def _check(vector: dict[str, Any], got: dict[str, Any]) -> None:
    label = vector["id"]
    if vector.get("expect_error"):
        assert got["ok"] is False, label
        assert "MIC" in got["error"], label
        return
    assert got["ok"] is True, label
    wanted = [(*FIELDS[name], value) for name, value in vector["expect"]["objects"]]
    got_records = [(r["n"], r["u"], r["v"]) for r in got["records"]]
    assert got_records == [(n, u, pytest.approx(v)) for n, u, v in wanted], label


def test_every_vector_decodes_through_the_command_line() -> None:
    cases = _vectors() + DOCUMENTED_ENCRYPTED
    keys = {(c["mac"], c["key"]) for c in cases if "key" in c}
    for mac, key in sorted(keys):  # one run per key: plain packets ignore --mac/--key
        group = [c for c in cases if c.get("key", key) == key and c.get("mac", mac) == mac]
        lines, status = _decode(
            "--mac", mac, "--key", key, *[c["hex"].replace(" ", "") for c in group]
        )
        assert len(lines) == len(group)
        for case, got in zip(group, lines, strict=True):
            _check(case, got)
        assert status == (1 if any(c.get("expect_error") for c in group) else 0)
    assert len(keys) == 2  # the vector file's wrong key, and the documented key


def test_encrypted_packets_need_mac_and_key_and_plain_ones_do_not() -> None:
    sealed = DOCUMENTED_ENCRYPTED[0]["hex"].replace(" ", "")
    plain = _vectors()[1]["hex"].replace(" ", "")
    (encrypted, decoded), status = _decode(sealed, plain)
    assert encrypted == {
        "ok": False,
        "error": "encrypted BTHome packet: --mac and --key are needed to decrypt it",
    }
    assert decoded["ok"] is True
    assert status == 1
    (short_key,), _ = _decode("--mac", DOC_MAC, "--key", "231d39", sealed)
    assert short_key["ok"] is False
    assert "32 hex digits" in short_key["error"]
