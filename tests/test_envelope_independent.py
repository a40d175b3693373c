"""Messages sealed by agent.envelope verify under pycose, an independent COSE library.

pycose runs in its own virtualenv (.venv-pycose, made by `make venv` from
tests/independent/requirements.txt) because it needs cbor2 < 6; the check
script talks JSON lines over a pipe. CITYGATE_PYCOSE_PYTHON overrides the
interpreter. A missing interpreter fails the test: it is never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.envelope import encode_senml, seal, signer_for
from drivers.base import Reading

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CHECK_SCRIPT = ROOT / "tests" / "independent" / "cose_check.py"
GOLDEN_PATH = ROOT / "tests" / "vectors" / "envelope_golden.json"
GW = "gw-0042"
TOPIC = f"citygate/{GW}/telemetry"
READINGS = (
    Reading("bin-07", "distance", 1.234, "m", 1767225600.25),
    Reading("aq-01", "temperature", 21.5, "Cel", 1767225601.5),
    Reading("bin-07", "fill_level", 42.0, "%", 1767225660.75),
)
Key = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _pycose_python() -> Path:
    override = os.environ.get("CITYGATE_PYCOSE_PYTHON")
    python = Path(override) if override else ROOT / ".venv-pycose" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} not found: run `make venv` to create .venv-pycose")
    return python


def _pem(key: Key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def _pycose(requests: list[tuple[bytes, str, Key]]) -> list[dict[str, Any]]:
    """Ask cose_check.py about each (message, topic, key); one answer per request."""
    lines = "".join(
        json.dumps({"message": m.hex(), "topic": t, "public_key_pem": _pem(k)}) + "\n"
        for m, t, k in requests
    )
    done = subprocess.run(
        [str(_pycose_python()), str(CHECK_SCRIPT)],
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == len(requests), done.stdout + done.stderr
    return answers


def _sealed(key: Key, seq: int) -> tuple[bytes, bytes]:
    senml = encode_senml(GW, READINGS)
    message = seal(
        senml, signer=signer_for(key), gateway_id=GW, seq=seq, iat=1767225700, topic=TOPIC
    )
    return senml, message


def _flip(message: bytes, bit: int) -> bytes:
    flipped = bytearray(message)
    flipped[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(flipped)


@pytest.mark.parametrize(
    "make_key", [Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1())]
)
def test_pycose_verifies_our_messages_and_reads_the_same_claims(
    make_key: Callable[[], Key],
) -> None:
    key = make_key()
    senml, message = _sealed(key, seq=2**40 + 3)
    (answer,) = _pycose([(message, TOPIC, key)])
    assert answer == {
        "ok": True,
        "error": None,
        "gateway_id": GW,
        "seq": 2**40 + 3,
        "payload_hex": senml.hex(),
    }


@pytest.mark.parametrize(
    "make_key", [Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1())]
)
def test_pycose_refuses_flipped_bits_and_another_topic(make_key: Callable[[], Key]) -> None:
    key = make_key()
    _, message = _sealed(key, seq=1)
    signature_bit = (len(message) - 10) * 8 + 3
    payload_bit = (len(message) - 100) * 8
    header_bit = 20 * 8 + 1  # inside the kid
    requests = [
        (_flip(message, signature_bit), TOPIC, key),
        (_flip(message, payload_bit), TOPIC, key),
        (_flip(message, header_bit), TOPIC, key),
        (message, "citygate/gw-0043/telemetry", key),
        (message, TOPIC, Ed25519PrivateKey.generate()),
    ]
    answers = _pycose(requests)
    assert [a["ok"] for a in answers] == [False] * len(requests), answers


def test_pycose_verifies_the_golden_vector() -> None:
    vector = json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key_ed25519_hex"]))
    (answer,) = _pycose([(bytes.fromhex(vector["message_hex"]), vector["topic"], key)])
    assert answer["ok"], answer
    assert (answer["gateway_id"], answer["seq"]) == (vector["gateway_id"], vector["seq"])
    assert answer["payload_hex"] == vector["senml_hex"]


def test_missing_pycose_interpreter_fails_with_instructions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CITYGATE_PYCOSE_PYTHON", str(ROOT / "no-such-venv" / "bin" / "python"))
    with pytest.raises(pytest.fail.Exception, match="make venv"):
        _pycose_python()
