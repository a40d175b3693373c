"""The gateway's identity: its private key, its client certificate and its CA bundle.

`load_identity` reads the three files and refuses anything a technician must fix
before the gateway may talk to the cloud: a key readable by other users, an
unsupported or encrypted key, a certificate for another key, a certificate outside
its validity window, a certificate not issued by a CA of the bundle, or a common
name that cannot serve as a gateway id (an MQTT topic level).

A gateway without a battery-backed clock boots at 1970: its certificate then
looks "not valid yet". A clock before the certificate's start is below the
trust floor (agent.clock), so it is the clock that is wrong, not the
certificate; the service therefore loads with `early_clock_ok`, logs a warning
and starts (readings keep boot-relative times until the clock is set; the
broker's TLS handshake fails until then). An expired certificate is always
refused.

Trust: the files are read from local disk and trusted only after every check here
passes. The CA bundle is the trust anchor; it is taken as configured (this module
decides nothing about which CAs are right, only that the certificate chains to one
of them directly).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from agent.keys import PrivateKey, PublicKey, kid_for, spki_der

log = logging.getLogger(__name__)

_GATEWAY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class IdentityError(Exception):
    """The identity files are unusable; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Identity:
    """A loaded, checked gateway identity."""

    gateway_id: str
    key: PrivateKey
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path
    ca_path: Path
    kid: bytes

    @property
    def not_after(self) -> datetime:
        """The end of the certificate's validity, in UTC."""
        return self.certificate.not_valid_after_utc


def is_valid_gateway_id(text: str) -> bool:
    """True when `text` can be a gateway id: 1-64 characters of [A-Za-z0-9._-]."""
    return _GATEWAY_ID.fullmatch(text) is not None


def _describe_key(key: object) -> str:
    """A short human name for a key's type, for error messages."""
    if isinstance(key, EllipticCurvePrivateKey | EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name.lstrip("_") or type(key).__name__


def public_key_of(cert: x509.Certificate) -> PublicKey:
    """The certificate's public key, if it is Ed25519 or ECDSA P-256."""
    try:
        key = cert.public_key()
    except UnsupportedAlgorithm as exc:
        raise IdentityError(
            f"certificate {cert.subject.rfc4514_string()!r} has an unsupported public key "
            f"({exc}): issue a certificate for an Ed25519 or ECDSA P-256 key"
        ) from exc
    if isinstance(key, Ed25519PublicKey) or (
        isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    ):
        return key
    raise IdentityError(
        f"certificate {cert.subject.rfc4514_string()!r} holds a {_describe_key(key)} key: "
        "issue a certificate for an Ed25519 or ECDSA P-256 key"
    )


def gateway_id_of(cert: x509.Certificate) -> str:
    """The gateway id named by the certificate: its subject common name, checked."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise IdentityError(
            f"certificate {cert.subject.rfc4514_string()!r} has no common name: "
            "issue a certificate whose CN is the gateway id"
        )
    value = names[0].value
    cn = value if isinstance(value, str) else value.decode("utf-8", "replace")
    if not is_valid_gateway_id(cn):
        raise IdentityError(
            f"certificate common name {cn!r} is not a valid gateway id "
            "(1-64 characters of A-Z a-z 0-9 . _ -; no '/', '+' or '#'): "
            "issue a certificate with a valid CN"
        )
    return cn


def _read(path: Path, what: str, *, private: bool = False) -> bytes:
    """Read a whole file; when `private`, refuse it if group or others may access it."""
    try:
        with path.open("rb") as stream:
            if private:
                _check_key_mode(path, stat.S_IMODE(os.fstat(stream.fileno()).st_mode))
            return stream.read()
    except FileNotFoundError as exc:
        raise IdentityError(
            f"{what} {path} does not exist: provision the gateway or fix the path in the config"
        ) from exc
    except OSError as exc:
        raise IdentityError(
            f"{what} {path} cannot be read ({exc.strerror}): check its owner and permissions"
        ) from exc


def _check_key_mode(path: Path, mode: int) -> None:
    if mode & 0o077:
        raise IdentityError(
            f"key file {path} is readable by group/others (mode {mode:04o}): run chmod 600 {path}"
        )


def _load_key(path: Path) -> PrivateKey:
    data = _read(path, "key file", private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise IdentityError(
            f"key file {path} is encrypted: store the key unencrypted with mode 0600 "
            "(the service cannot type a passphrase)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(
            f"key file {path} is not a readable PEM private key: re-provision the gateway key"
        ) from exc
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, EllipticCurvePrivateKey) and isinstance(key.curve, SECP256R1):
        return key
    raise IdentityError(
        f"key file {path} holds a {_describe_key(key)} key, not Ed25519 or ECDSA P-256: "
        "generate a new Ed25519 or P-256 key and certificate"
    )


def _load_certificate(path: Path) -> x509.Certificate:
    data = _read(path, "certificate file")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(
            f"certificate file {path} is not a PEM certificate: install the gateway certificate"
        ) from exc


def _load_ca_bundle(path: Path) -> list[x509.Certificate]:
    data = _read(path, "CA file")
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(
            f"CA file {path} holds no readable PEM certificate: install the CA bundle"
        ) from exc
    return cas


def _check_validity(
    cert: x509.Certificate, path: Path, now: datetime, what: str, *, early_clock_ok: bool
) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start and not early_clock_ok:
        raise IdentityError(
            f"{what} {path} is not valid yet (valid {start:%Y-%m-%d %H:%M:%S} to "
            f"{end:%Y-%m-%d %H:%M:%S} UTC, now {now:%Y-%m-%d %H:%M:%S} UTC): "
            "check the gateway clock"
        )
    if now > end:
        raise IdentityError(
            f"{what} {path} expired on {end:%Y-%m-%d %H:%M:%S} UTC (valid from "
            f"{start:%Y-%m-%d %H:%M:%S}, now {now:%Y-%m-%d %H:%M:%S} UTC): "
            "renew the certificate, or check the gateway clock"
        )


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _find_issuer(
    cert: x509.Certificate, cert_path: Path, cas: list[x509.Certificate], ca_path: Path
) -> x509.Certificate:
    for ca in cas:
        if issued_by(cert, ca):
            return ca
    raise IdentityError(
        f"certificate {cert_path} (issuer {cert.issuer.rfc4514_string()!r}) was not issued by "
        f"any CA in {ca_path}: install the matching CA bundle or a certificate from that CA"
    )


def load_identity(
    key_path: Path,
    cert_path: Path,
    ca_path: Path,
    *,
    now: datetime | None = None,
    early_clock_ok: bool = False,
) -> Identity:
    """Load and check the gateway's key, certificate and CA bundle; raise IdentityError.

    With `early_clock_ok` a certificate (or CA) that is not valid yet is taken
    with a warning: the clock is before its start, so the clock is untrusted
    (agent.clock). For callers that cope with an untrusted clock: the service.
    """
    moment = now if now is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    key = _load_key(key_path)
    cert = _load_certificate(cert_path)
    cas = _load_ca_bundle(ca_path)
    cert_key = public_key_of(cert)
    if spki_der(cert_key) != spki_der(key.public_key()):
        raise IdentityError(
            f"certificate {cert_path} is for another key than {key_path}: "
            "install the certificate issued for this key (or the key it was issued for)"
        )
    _check_validity(cert, cert_path, moment, "certificate", early_clock_ok=early_clock_ok)
    issuer = _find_issuer(cert, cert_path, cas, ca_path)
    _check_validity(issuer, ca_path, moment, "CA certificate in", early_clock_ok=early_clock_ok)
    start = max(cert.not_valid_before_utc, issuer.not_valid_before_utc)
    if moment < start:  # only with early_clock_ok
        log.warning(
            "the clock says %s UTC, before certificate %s is valid (from %s UTC): the clock "
            "looks wrong; readings keep boot-relative times and the broker's TLS handshake "
            "fails until the clock is set (NTP)",
            f"{moment:%Y-%m-%d %H:%M:%S}",
            cert_path,
            f"{start:%Y-%m-%d %H:%M:%S}",
        )
    gateway_id = gateway_id_of(cert)
    return Identity(
        gateway_id=gateway_id,
        key=key,
        certificate=cert,
        key_path=key_path,
        cert_path=cert_path,
        ca_path=ca_path,
        kid=kid_for(cert_key),
    )
