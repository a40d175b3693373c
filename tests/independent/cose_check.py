"""Verify citygate telemetry with pycose, an implementation we did not write.

Runs under `.venv-pycose/bin/python` (pycose 1.1 needs cbor2 < 6, the project
pins cbor2 6), so it imports only pycose, cbor2, cryptography and the standard
library, never the project. Reads JSON lines from stdin, each
``{"message": hex, "topic": str, "public_key_pem": str}``, and writes one JSON
line per input: ``{"ok": bool, "error": str | null, "gateway_id": str | null,
"seq": int | null, "payload_hex": str | null}``.

It trusts nothing in the message; it trusts the key and topic it is given.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pycose.keys import CoseKey  # type: ignore[import-not-found]
from pycose.messages import Sign1Message  # type: ignore[import-not-found]

_CWT_CLAIMS = 15  # RFC 9597 header label
_CLAIM_ISS, _CLAIM_SEQ = 1, 7


def check(message_hex: str, topic: str, public_key_pem: str) -> dict[str, Any]:
    """Decode and verify one message; the claims are reported only if it verifies."""
    message: Any = Sign1Message.decode(bytes.fromhex(message_hex))
    message.key = CoseKey.from_pem_public_key(public_key_pem)
    message.external_aad = topic.encode("utf-8")
    if not message.verify_signature():
        return {"ok": False, "error": "signature does not verify", **_no_claims()}
    claims = message.phdr[_CWT_CLAIMS]
    return {
        "ok": True,
        "error": None,
        "gateway_id": claims[_CLAIM_ISS],
        "seq": int.from_bytes(claims[_CLAIM_SEQ], "big"),
        "payload_hex": message.payload.hex(),
    }


def _no_claims() -> dict[str, None]:
    return {"gateway_id": None, "seq": None, "payload_hex": None}


def main() -> int:
    """Answer every input line; a failure is an answer, not a crash."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            answer = check(request["message"], request["topic"], request["public_key_pem"])
        # pycose reports bad input with many exception types; each is a "not ok".
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", **_no_claims()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
