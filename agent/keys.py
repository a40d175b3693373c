"""Key types the gateway signs and authenticates with, and their key id.

Pure: no I/O. Ed25519 by default, ECDSA P-256 where the key lives in a secure
element (DESIGN.md §3). The key id is what a message's `kid` header carries.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import (
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PrivateKey = Ed25519PrivateKey | EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | EllipticCurvePublicKey

KID_BYTES: Final = 16


def spki_der(key: PublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def kid_for(public_key: PublicKey) -> bytes:
    """The key id of DESIGN.md §3: the first 16 bytes of SHA-256 over the DER SPKI."""
    return hashlib.sha256(spki_der(public_key)).digest()[:KID_BYTES]
