"""BTHome v2 encryption: AES-128-CCM with a 4-byte MIC, per the BTHome format.

CPython only (it uses `cryptography`'s AESCCM); the pure codec stays
portable. `decrypt` turns encrypted service data into the plaintext service
data that `codec.decode` reads; `encrypt` is its inverse, for emulators.

Encrypted service data (after the UUID) is::

    info byte (bit 0 set) | [6 MAC bytes, reversed, if info bit 1] | ciphertext |
    counter (uint32 LE) | MIC (4 bytes)

The 13-byte nonce is the device MAC (6 bytes in display order), the UUID
0xFCD2 little-endian (D2 FC), the info byte as sent, and the 4 counter bytes
as sent. There is no associated data. When the device includes its MAC (info
bit 1), that MAC builds the nonce, as bthome-ble does.

Trust: nothing in the packet is believed until the MIC verifies under the
configured key; a wrong key, a wrong MAC and a tampered byte all look the same
and raise `BTHomeBadMic`. Replay protection (an increasing counter) is the
caller's job: `counter_of` gives the counter.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.bthome.codec import INFO_ENCRYPTED, INFO_MAC_INCLUDED, BTHomeError

KEY_LEN = 16
MIC_LEN = 4
COUNTER_LEN = 4
_UUID_LE = b"\xd2\xfc"
_MAC_LEN = 6


class BTHomeBadMic(BTHomeError):
    """The message integrity check failed: wrong key, wrong MAC, or altered bytes."""


def parse_mac(mac: str) -> bytes:
    """Parse "AA:BB:CC:DD:EE:FF" (':' or '-' separators, or none) into 6 bytes."""
    text = mac.replace(":", "").replace("-", "")
    if len(text) != 2 * _MAC_LEN:
        raise BTHomeError(f"mac {mac!r} does not have 6 bytes")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BTHomeError(f"mac {mac!r} is not hexadecimal") from None


def parse_key(key: str) -> bytes:
    """Parse a bind key written as 32 hex digits."""
    try:
        raw = bytes.fromhex(key.strip())
    except ValueError:
        raise BTHomeError("key is not hexadecimal") from None
    if len(raw) != KEY_LEN:
        raise BTHomeError(f"key has {len(raw)} bytes, expected 16 (32 hex digits)")
    return raw


def _cipher(key: bytes) -> AESCCM:
    if len(key) != KEY_LEN:
        raise BTHomeError(f"key has {len(key)} bytes, expected 16 (32 hex digits)")
    return AESCCM(key, tag_length=MIC_LEN)


def _split(data: bytes) -> tuple[int, bytes, bytes, bytes, bytes]:
    """(info, embedded MAC or b"", ciphertext, counter bytes, MIC) of encrypted service data."""
    if len(data) == 0:
        raise BTHomeError("empty service data")
    info = data[0]
    if not info & INFO_ENCRYPTED:
        raise BTHomeError(f"device info 0x{info:02x} does not say the packet is encrypted")
    head = 1 + (_MAC_LEN if info & INFO_MAC_INCLUDED else 0)
    if len(data) < head + COUNTER_LEN + MIC_LEN:
        raise BTHomeError(
            f"encrypted packet is {len(data)} bytes, too short for counter and MIC"
            f" (at least {head + COUNTER_LEN + MIC_LEN})"
        )
    mic_at = len(data) - MIC_LEN
    counter_at = mic_at - COUNTER_LEN
    return info, data[1:head], data[head:counter_at], data[counter_at:mic_at], data[mic_at:]


def _nonce(mac: bytes, info: int, counter: bytes) -> bytes:
    return mac + _UUID_LE + bytes([info]) + counter


def counter_of(data: bytes) -> int:
    """The encryption counter (uint32) of encrypted service data; not authenticated yet."""
    _info, _mac, _ct, counter, _mic = _split(data)
    return int.from_bytes(counter, "little")


def decrypt(data: bytes, mac: str, key: bytes) -> bytes:
    """Verify and decrypt encrypted service data; return plaintext service data.

    The result is the info byte with the encryption flag cleared, the
    embedded MAC if there was one, then the decrypted objects, ready for
    `codec.decode`. Raises BTHomeBadMic if the MIC does not verify.
    """
    info, embedded, ciphertext, counter, mic = _split(data)
    nonce_mac = embedded[::-1] if embedded else parse_mac(mac)
    try:
        plain = _cipher(key).decrypt(_nonce(nonce_mac, info, counter), ciphertext + mic, None)
    except InvalidTag:
        raise BTHomeBadMic(
            "MIC check failed: wrong key, wrong MAC, or a corrupted packet"
        ) from None
    return bytes([info & ~INFO_ENCRYPTED]) + embedded + plain


def encrypt(plain: bytes, mac: str, key: bytes, counter: int) -> bytes:
    """Encrypt plaintext service data (as `codec.encode` builds it); the inverse of `decrypt`."""
    if len(plain) == 0:
        raise BTHomeError("empty service data")
    if counter < 0 or counter > 0xFFFFFFFF:
        raise BTHomeError(f"counter {counter} does not fit 32 bits")
    info = plain[0] | INFO_ENCRYPTED
    head = 1 + (_MAC_LEN if info & INFO_MAC_INCLUDED else 0)
    if len(plain) < head:
        raise BTHomeError("device info says a MAC is included but it is missing")
    embedded = plain[1:head]
    nonce_mac = embedded[::-1] if embedded else parse_mac(mac)
    counter_bytes = counter.to_bytes(COUNTER_LEN, "little")
    sealed = _cipher(key).encrypt(_nonce(nonce_mac, info, counter_bytes), plain[head:], None)
    ciphertext, mic = sealed[:-MIC_LEN], sealed[-MIC_LEN:]
    return bytes([info]) + embedded + ciphertext + counter_bytes + mic
