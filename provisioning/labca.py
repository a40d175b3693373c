"""A LAB certificate authority in a directory: for tests, demos and small labs only.

`init_ca` makes `ca.key` (mode 0600) and `ca.crt` in a directory; `sign_csr`
turns a gateway's CSR into a client certificate. A production fleet uses an
existing CA (an enterprise PKI, a cloud IoT CA, an HSM-backed issuing CA):
nothing here protects the CA key beyond file permissions, and there is no
policy, revocation list or approval step. It uses `provisioning.pki`.

What `sign_csr` guarantees: the CSR's signature is verified (it was made with
the key it names), the key is Ed25519 or ECDSA P-256, and only the common name
(a valid gateway id) and the hardware serialNumber are copied from the
request; every other subject attribute and every requested extension is
ignored. The certificate is for TLS client authentication only, and a copy is
kept in `<dir>/issued/<serial>.crt`.

Trust: the CSR comes from outside and is untrusted until checked here; the CA
directory is trusted as the operator's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from agent.identity import is_valid_gateway_id, public_key_of
from agent.keys import PrivateKey, PublicKey, spki_der
from provisioning.identity_tools import load_device_key, usable_serial
from provisioning.pki import (
    create_ca,
    generate_key,
    issue_certificate,
    write_certificate,
    write_private_key,
)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
ISSUED = "issued"
DEFAULT_CA_NAME = "citygate lab CA"


class LabCaError(Exception):
    """The lab CA cannot do what was asked; the message says what to do."""


@dataclass(frozen=True)
class LabCa:
    directory: Path
    cert: x509.Certificate
    key: PrivateKey


def init_ca(directory: Path, *, name: str = DEFAULT_CA_NAME, days: int = 3650) -> Path:
    """Create a lab CA (ECDSA P-256) in `directory`; refuse if one is there. Returns ca.crt."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    for path in (key_path, cert_path):
        if path.exists():
            raise LabCaError(
                f"{path} exists: {directory} already holds a CA; choose another directory "
                "(a CA is never overwritten: every certificate it issued depends on it)"
            )
    if days < 1:
        raise LabCaError(f"--days {days}: a CA must be valid for at least one day")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_key("p256")
    write_private_key(key_path, key)
    write_certificate(cert_path, create_ca(name, key, days=days))
    return cert_path


def load_ca(directory: Path) -> LabCa:
    """The CA of `directory`: its certificate and (private, matching) key."""
    cert_path = directory / CA_CERT
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise LabCaError(
            f"no CA in {directory} ({CA_CERT} missing): create one with "
            f"`citygate provision ca init {directory}`"
        ) from None
    except (OSError, ValueError) as exc:
        raise LabCaError(f"{cert_path} is not a readable PEM certificate ({exc})") from None
    if not (directory / CA_KEY).exists():
        raise LabCaError(f"{directory} has {CA_CERT} but no {CA_KEY}: this CA cannot sign here")
    key = load_device_key(directory / CA_KEY)  # refuses a CA key others may read
    if spki_der(key.public_key()) != spki_der(public_key_of(cert)):
        raise LabCaError(f"{directory}: {CA_KEY} is not the key of {CA_CERT}")
    return LabCa(directory, cert, key)


def read_csr(path: Path) -> x509.CertificateSigningRequest:
    """A CSR file (PEM or DER) whose signature is valid; LabCaError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabCaError(f"cannot read CSR {path} ({exc.strerror})") from None
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise LabCaError(
            f"{path} is not a certificate signing request: make one on the gateway with "
            "`citygate provision csr`"
        ) from None
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm:
        valid = False
    if not valid:
        raise LabCaError(
            f"CSR {path} has an invalid signature (altered, or not made with the key it "
            "holds): make a new CSR on the gateway"
        )
    return csr


def _requested_key(csr: x509.CertificateSigningRequest, path: Path) -> PublicKey:
    try:
        key = csr.public_key()
    except UnsupportedAlgorithm:
        key = None
    if isinstance(key, Ed25519PublicKey) or (
        isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    ):
        return key
    raise LabCaError(
        f"CSR {path} is for a key that is not Ed25519 or ECDSA P-256: generate the gateway "
        "key with `citygate provision keygen`"
    )


def _single(csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier) -> str | None:
    values = [attr.value for attr in csr.subject.get_attributes_for_oid(oid)]
    if len(values) > 1:
        raise LabCaError(f"the CSR names {oid.dotted_string} {len(values)} times: expected once")
    if not values:
        return None
    value = values[0]
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _subject(csr: x509.CertificateSigningRequest, path: Path) -> tuple[str, str | None]:
    """The common name and serialNumber of the request, both checked."""
    cn = _single(csr, NameOID.COMMON_NAME)
    if cn is None or not is_valid_gateway_id(cn):
        raise LabCaError(
            f"CSR {path} has common name {cn!r}, not a valid gateway id "
            "(1-64 characters of A-Z a-z 0-9 . _ -): make it with "
            "`citygate provision csr --gateway-id ID`"
        )
    serial = _single(csr, NameOID.SERIAL_NUMBER)
    if serial is not None and not usable_serial(serial):
        raise LabCaError(f"CSR {path} has an unusable serialNumber {serial!r}")
    return cn, serial


def sign_csr(
    ca: LabCa, csr: x509.CertificateSigningRequest, path: Path, *, days: int
) -> x509.Certificate:
    """A client certificate for the CSR's key: CN and serialNumber copied, nothing else."""
    public_key = _requested_key(csr, path)
    cn, serial = _subject(csr, path)
    if days < 1:
        raise LabCaError(f"--days {days}: a certificate must be valid for at least one day")
    cert = issue_certificate(
        ca.cert, ca.key, cn, public_key, days=days, client=True, serial_number=serial
    )
    issued = ca.directory / ISSUED
    issued.mkdir(mode=0o700, exist_ok=True)
    write_certificate(issued / f"{cert.serial_number:x}.crt", cert)
    return cert


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
