"""Loading the gateway identity and refusing bad credentials with a fix in the message."""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.identity import (
    Identity,
    IdentityError,
    gateway_id_of,
    is_valid_gateway_id,
    load_identity,
    public_key_of,
)
from agent.keys import PrivateKey, PublicKey, kid_for
from agent.tls import client_context, verifier_context
from provisioning.pki import (
    LabFiles,
    create_ca,
    generate_key,
    issue_certificate,
    make_lab_pki,
    write_certificate,
)


@dataclass(frozen=True)
class Lab:
    files: LabFiles
    ca_key: PrivateKey
    ca_cert: x509.Certificate

    def client(self, name: str) -> tuple[Path, Path]:
        return self.files.clients[name]


def _open_lab(
    directory: Path, *, kind: str = "ed25519", clients: tuple[str, ...] = ("gw-1",)
) -> Lab:
    files = make_lab_pki(directory, clients=clients, client_key_kind=kind)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    return Lab(files=files, ca_key=ca_key, ca_cert=ca_cert)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return _open_lab(tmp_path / "lab")


def _load(lab: Lab, name: str = "gw-1", *, now: datetime | None = None) -> Identity:
    cert, key = lab.client(name)
    return load_identity(key, cert, lab.files.ca_cert, now=now)


def _refusal(lab: Lab, name: str = "gw-1", *, now: datetime | None = None) -> str:
    with pytest.raises(IdentityError) as caught:
        _load(lab, name, now=now)
    message = str(caught.value)
    assert "\n" not in message
    assert ": " in message  # "what is wrong: what to do"
    return message


def _write_raw_key(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(pem)


def _build_certificate(
    lab: Lab,
    public_key: PublicKey,
    *,
    subject: x509.Name,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(lab.ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    return builder.sign(lab.ca_key, hashes.SHA256())


def _replace_certificate(lab: Lab, name: str, cert: x509.Certificate) -> None:
    write_certificate(lab.client(name)[0], cert)


def _client_public_key(lab: Lab, name: str = "gw-1") -> PublicKey:
    return public_key_of(x509.load_pem_x509_certificate(lab.client(name)[0].read_bytes()))


# --- a good identity -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_good_identity_loads_with_cn_as_gateway_id_and_matching_kid(
    tmp_path: Path, kind: str
) -> None:
    lab = _open_lab(tmp_path, kind=kind, clients=("bin-gw_07.north",))
    identity = _load(lab, "bin-gw_07.north")

    assert identity.gateway_id == "bin-gw_07.north"
    assert len(identity.kid) == 16
    cert_key = public_key_of(identity.certificate)
    assert identity.kid == kid_for(cert_key)
    spki = cert_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert identity.kid == hashlib.sha256(spki).digest()[:16]
    assert identity.kid == kid_for(identity.key.public_key())


def test_not_after_is_the_certificate_end_in_utc(lab: Lab) -> None:
    identity = _load(lab)
    assert identity.not_after == identity.certificate.not_valid_after_utc
    assert identity.not_after.utcoffset() == timedelta(0)


def test_identity_records_the_paths_it_was_loaded_from(lab: Lab) -> None:
    identity = _load(lab)
    cert, key = lab.client("gw-1")
    assert (identity.key_path, identity.cert_path, identity.ca_path) == (
        key,
        cert,
        lab.files.ca_cert,
    )


def test_ca_bundle_with_several_certificates_finds_the_issuer(lab: Lab, tmp_path: Path) -> None:
    other = _open_lab(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.files.ca_cert.read_bytes() + lab.files.ca_cert.read_bytes())
    cert, key = lab.client("gw-1")
    assert load_identity(key, cert, bundle).gateway_id == "gw-1"


# --- refusals: files -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["key", "cert", "ca"])
def test_missing_file_is_refused_naming_the_file(lab: Lab, which: str) -> None:
    cert, key = lab.client("gw-1")
    missing = {"key": key, "cert": cert, "ca": lab.files.ca_cert}[which]
    missing.unlink()
    message = _refusal(lab)
    assert str(missing) in message
    assert "does not exist" in message


def test_key_readable_by_others_is_refused_with_chmod_fix(lab: Lab) -> None:
    key = lab.client("gw-1")[1]
    key.chmod(0o644)
    message = _refusal(lab)
    assert str(key) in message
    assert "0644" in message
    assert f"chmod 600 {key}" in message


def test_key_readable_by_group_only_is_refused(lab: Lab) -> None:
    key = lab.client("gw-1")[1]
    key.chmod(0o640)
    assert "0640" in _refusal(lab)


def test_rsa_key_is_refused_naming_its_type(lab: Lab) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_raw_key(
        lab.client("gw-1")[1],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    message = _refusal(lab)
    assert "RSA-2048" in message
    assert "Ed25519 or ECDSA P-256" in message


def test_ecdsa_key_on_another_curve_is_refused_naming_the_curve(lab: Lab) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _write_raw_key(
        lab.client("gw-1")[1],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    assert "secp384r1" in _refusal(lab)


def test_encrypted_key_is_refused(lab: Lab) -> None:
    key_path = lab.client("gw-1")[1]
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    _write_raw_key(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    )
    message = _refusal(lab)
    assert str(key_path) in message
    assert "encrypted" in message


def test_garbage_key_file_is_refused(lab: Lab) -> None:
    _write_raw_key(lab.client("gw-1")[1], b"not a key\n")
    assert "not a readable PEM private key" in _refusal(lab)


def test_garbage_certificate_file_is_refused(lab: Lab) -> None:
    cert = lab.client("gw-1")[0]
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    message = _refusal(lab)
    assert str(cert) in message


# --- refusals: certificate -------------------------------------------------------------


def test_certificate_for_another_key_is_refused(lab: Lab) -> None:
    other = generate_key("ed25519")
    cert = issue_certificate(lab.ca_cert, lab.ca_key, "gw-1", other.public_key(), days=5)
    _replace_certificate(lab, "gw-1", cert)
    message = _refusal(lab)
    assert "another key" in message
    assert str(lab.client("gw-1")[0]) in message


def test_certificate_is_refused_when_the_clock_is_past_its_end(lab: Lab) -> None:
    message = _refusal(lab, now=datetime(2199, 1, 1, tzinfo=UTC))
    assert "expired on" in message
    assert str(lab.client("gw-1")[0]) in message
    assert "renew" in message


def test_certificate_is_refused_when_the_clock_is_before_its_start(lab: Lab) -> None:
    message = _refusal(lab, now=datetime(2001, 1, 1, tzinfo=UTC))
    assert "not valid yet" in message
    assert "2001-01-01" in message


def test_certificate_issued_with_a_past_period_is_refused_with_its_dates(lab: Lab) -> None:
    start = datetime(2020, 3, 1, tzinfo=UTC)
    cert = _build_certificate(
        lab,
        _client_public_key(lab),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")]),
        not_before=start,
        not_after=start + timedelta(days=30),
    )
    _replace_certificate(lab, "gw-1", cert)
    message = _refusal(lab)
    assert "expired on 2020-03-31" in message
    assert "2020-03-01" in message


def test_certificate_from_another_ca_with_the_same_name_is_refused(
    lab: Lab, tmp_path: Path
) -> None:
    other = _open_lab(tmp_path / "other")
    assert other.ca_cert.subject == lab.ca_cert.subject  # only the signature tells them apart
    cert, key = other.client("gw-1")
    with pytest.raises(IdentityError) as caught:
        load_identity(key, cert, lab.files.ca_cert)
    assert str(lab.files.ca_cert) in str(caught.value)
    assert "not issued by" in str(caught.value)


def test_certificate_from_a_differently_named_ca_is_refused(lab: Lab) -> None:
    rogue_key = generate_key("p256")
    rogue_ca = create_ca("rogue CA", rogue_key)
    cert = issue_certificate(rogue_ca, rogue_key, "gw-1", _client_public_key(lab), days=5)
    _replace_certificate(lab, "gw-1", cert)
    assert "CN=rogue CA" in _refusal(lab)


def test_certificate_from_an_expired_ca_is_refused(lab: Lab) -> None:
    now = datetime.now(UTC)
    expired_ca = (
        x509.CertificateBuilder()
        .subject_name(lab.ca_cert.subject)
        .issuer_name(lab.ca_cert.subject)
        .public_key(lab.ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=400))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(lab.ca_key, hashes.SHA256())
    )
    write_certificate(lab.files.ca_cert, expired_ca)
    message = _refusal(lab)
    assert "CA certificate" in message
    assert str(lab.files.ca_cert) in message
    assert "expired on" in message


def test_certificate_without_common_name_is_refused(lab: Lab) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "city")])
    now = datetime.now(UTC)
    cert = _build_certificate(
        lab, _client_public_key(lab), subject=subject, not_before=now, not_after=now + timedelta(1)
    )
    _replace_certificate(lab, "gw-1", cert)
    assert "no common name" in _refusal(lab)


@pytest.mark.parametrize("cn", ["city/gw-1", "gw+1", "gw#1", "gw 1", "gw-ü"])
def test_common_name_that_is_not_a_topic_level_is_refused(lab: Lab, cn: str) -> None:
    cert = issue_certificate(lab.ca_cert, lab.ca_key, cn, _client_public_key(lab), days=5)
    _replace_certificate(lab, "gw-1", cert)
    message = _refusal(lab)
    assert repr(cn) in message
    assert "not a valid gateway id" in message


def test_gateway_id_of_accepts_64_characters(lab: Lab) -> None:
    cn = "a" * 64
    cert = issue_certificate(lab.ca_cert, lab.ca_key, cn, _client_public_key(lab), days=5)
    assert gateway_id_of(cert) == cn


@pytest.mark.parametrize(
    ("text", "valid"),
    [("gw-1", True), ("A.b_c-9", True), ("g" * 64, True), ("g" * 65, False), ("", False)],
)
def test_gateway_id_is_one_to_64_topic_safe_characters(text: str, valid: bool) -> None:
    assert is_valid_gateway_id(text) is valid


def test_public_key_of_refuses_rsa_certificates(lab: Lab) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_certificate(
        lab.ca_cert,
        lab.ca_key,
        "gw-1",
        rsa_key.public_key(),  # type: ignore[arg-type]
        days=5,
    )
    with pytest.raises(IdentityError, match="RSA-2048"):
        public_key_of(cert)


# --- TLS contexts ----------------------------------------------------------------------


def test_client_context_requires_a_verified_server_over_tls12_or_newer(lab: Lab) -> None:
    context = client_context(_load(lab))
    assert context.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1


def test_verifier_context_uses_the_same_settings(lab: Lab) -> None:
    cert, key = lab.client("gw-1")
    context = verifier_context(cert, key, lab.files.ca_cert)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.integration
def test_lab_certificates_verify_with_the_openssl_command_line(lab: Lab) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is missing: run `make venv` (it installs it)"
    ca = str(lab.files.ca_cert)
    for cert, purpose in [
        (lab.client("gw-1")[0], "sslclient"),
        (lab.files.server_cert, "sslserver"),
    ]:
        result = subprocess.run(
            [openssl, "verify", "-CAfile", ca, "-purpose", purpose, str(cert)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
