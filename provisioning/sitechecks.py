"""Checks of single site-file values: each returns what is wrong, or None.

Pure functions of a value, used by `provisioning.site`. The rules come from
what receives the value: host names from RFC 1123, Wi-Fi from WPA2-PSK (IEEE
802.11i), country codes from ISO 3166-1 (the radio's regulatory domain), PINs
from the SIM, PEM from what `cryptography` reads. A message never repeats a
secret value (passphrase, PIN, token, key).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from agent.identity import IdentityError, gateway_id_of

Check = Callable[[str], str | None]

_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_COUNTRY = re.compile(r"[A-Z]{2}")
_HEX_PSK = re.compile(r"[0-9A-Fa-f]{64}")
_PRINTABLE_ASCII = re.compile(r"[ -~]*")
_APN = re.compile(r"[A-Za-z0-9._-]{1,100}")
_PIN = re.compile(r"[0-9]{4,8}")
_TOKEN = re.compile(r"[!-~]{8,1024}")  # printable ASCII without spaces
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def host_problem(host: str) -> str | None:
    """A DNS name or an IP address."""
    labels = host.removesuffix(".").split(".")
    if len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"not a valid host name or IP address: {host!r}"
    return None


def hostname_problem(name: str) -> str | None:
    """The gateway's own host name: one DNS label, lower case."""
    if _HOSTNAME.fullmatch(name):
        return None
    return "must be 1 to 63 characters of a-z 0-9 -, not starting or ending with -"


def ssid_problem(ssid: str) -> str | None:
    if not 1 <= len(ssid.encode()) <= 32:
        return "must be 1 to 32 bytes long"
    if _CONTROL.search(ssid):
        return "must not contain control characters"
    return None


def passphrase_problem(passphrase: str) -> str | None:
    if _HEX_PSK.fullmatch(passphrase):
        return None
    if 8 <= len(passphrase) <= 63 and _PRINTABLE_ASCII.fullmatch(passphrase):
        return None
    return "must be 8 to 63 printable ASCII characters (WPA2-PSK), or 64 hex digits"


def country_problem(country: str) -> str | None:
    if _COUNTRY.fullmatch(country):
        return None
    return (
        "must be the two-letter country code in capitals (ISO 3166-1) where the gateway "
        f"stands, like 'DE'; got {country!r}"
    )


def apn_problem(apn: str) -> str | None:
    return None if _APN.fullmatch(apn) else "must be 1 to 100 characters of A-Z a-z 0-9 . _ -"


def pin_problem(pin: str) -> str | None:
    return None if _PIN.fullmatch(pin) else "must be 4 to 8 digits"


def credential_problem(value: str) -> str | None:
    if value and _PRINTABLE_ASCII.fullmatch(value) and value == value.strip():
        return None
    return "must be printable ASCII, without leading or trailing spaces"


def token_problem(token: str) -> str | None:
    if _TOKEN.fullmatch(token):
        return None
    return "must be 8 to 1024 printable ASCII characters without spaces, as operations gave it"


def certificates_problem(pem: str) -> str | None:
    """One or more PEM certificates, and nothing secret."""
    if "PRIVATE KEY-----" in pem:
        return "holds a private key: give certificates only (a CA's key never goes on a card)"
    try:
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return "holds no readable PEM certificate"
    return None


def key_problem(pem: str) -> str | None:
    """An unencrypted PEM private key."""
    try:
        serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        return "the key is encrypted: the gateway cannot type a passphrase; give it unencrypted"
    except (ValueError, UnsupportedAlgorithm):
        return "holds no readable PEM private key"
    return None


def claim_problem(cert_pem: str, gateway_id: str) -> str | None:
    """The claim certificate names the gateway (enrollment takes the gateway id from it)."""
    cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    try:
        named = gateway_id_of(cert)
    except IdentityError:
        return "has no valid gateway id as its common name: ask operations for this gateway's"
    if named != gateway_id:
        return f"is the claim certificate of gateway {named}, not of {gateway_id} (gateway.id)"
    return None


def pair_problem(cert_pem: str, key_pem: str) -> str | None:
    """The key belongs to the first certificate (both already checked)."""
    cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        return "is not the key of claim_cert (its first certificate)"
    return None
