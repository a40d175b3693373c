"""The lab PKI: key and certificate files, CA and leaf certificate contents."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity import load_identity
from provisioning.pki import (
    PkiError,
    create_ca,
    generate_key,
    issue_certificate,
    make_lab_pki,
    write_certificate,
    write_private_key,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 0, so only the code's own modes keep files private."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# --- keys ------------------------------------------------------------------------------


def test_generate_key_makes_ed25519_by_default_and_p256_on_request() -> None:
    assert isinstance(generate_key(), Ed25519PrivateKey)
    p256 = generate_key("p256")
    assert isinstance(p256, ec.EllipticCurvePrivateKey)
    assert isinstance(p256.curve, ec.SECP256R1)


def test_generate_key_refuses_unknown_kinds() -> None:
    with pytest.raises(PkiError, match="rsa"):
        generate_key("rsa")


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_private_key_file_is_0600_unencrypted_pkcs8_and_leaves_no_temp_files(
    tmp_path: Path, kind: str
) -> None:
    key = generate_key(kind)
    path = tmp_path / "gateway.key"
    write_private_key(path, key)

    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["gateway.key"]
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert loaded.public_key() == key.public_key()


@pytest.mark.usefixtures("open_umask")
def test_key_bytes_are_only_ever_written_to_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[tuple[str, int, int]] = []
    modes_at_write: list[int] = []
    real_open, real_write = os.open, os.write

    def spy_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: int) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    def spy_write(fd: int, data: bytes | memoryview) -> int:
        modes_at_write.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "write", spy_write)
    write_private_key(tmp_path / "gateway.key", generate_key())
    monkeypatch.undo()

    assert len(created) == 1
    temp_name, flags, mode = created[0]
    assert Path(temp_name).parent == tmp_path
    assert Path(temp_name).name != "gateway.key"
    assert flags & os.O_EXCL
    assert mode == 0o600
    assert modes_at_write
    assert all(written == 0o600 for written in modes_at_write)


def test_writing_a_key_replaces_a_world_readable_file_with_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "gateway.key"
    path.write_text("old")
    path.chmod(0o644)
    write_private_key(path, generate_key())
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.key"
    write_private_key(path, generate_key())
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_private_key(path, generate_key())
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["gateway.key"]


@pytest.mark.usefixtures("open_umask")
def test_certificate_file_is_0644_pem(tmp_path: Path) -> None:
    key = generate_key()
    cert = create_ca("lab", key)
    path = tmp_path / "ca.crt"
    write_certificate(path, cert)
    assert _mode(path) == 0o644
    assert x509.load_pem_x509_certificate(path.read_bytes()) == cert
    assert os.listdir(tmp_path) == ["ca.crt"]


# --- certificates ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "hash_name"), [("ed25519", None), ("p256", "sha256")])
def test_ca_is_self_signed_and_may_only_sign_certificates(kind: str, hash_name: str | None) -> None:
    key = generate_key(kind)
    ca = create_ca("City Lab CA", key, days=10)

    ca.verify_directly_issued_by(ca)
    algorithm = ca.signature_hash_algorithm
    assert (algorithm.name if algorithm else None) == hash_name
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "City Lab CA"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())


@pytest.mark.parametrize("ca_kind", ["ed25519", "p256"])
def test_client_certificate_is_a_signed_leaf_for_client_auth(ca_kind: str) -> None:
    ca_key = generate_key(ca_kind)
    ca = create_ca("lab", ca_key)
    leaf_key = generate_key()
    cert = issue_certificate(ca, ca_key, "gw-1", leaf_key.public_key(), days=7)

    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject
    assert cert.public_key() == leaf_key.public_key()
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_encipherment
    assert not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=7) <= lifetime <= timedelta(days=7, minutes=10)


def test_server_certificate_names_its_hosts_and_addresses() -> None:
    ca_key = generate_key("p256")
    ca = create_ca("lab", ca_key)
    cert = issue_certificate(
        ca,
        ca_key,
        "broker",
        generate_key("p256").public_key(),
        days=7,
        client=False,
        server=True,
        dns_names=["localhost", "broker.lab"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_certificate_for_both_uses_lists_both() -> None:
    ca_key = generate_key()
    ca = create_ca("lab", ca_key)
    cert = issue_certificate(
        ca, ca_key, "relay", generate_key().public_key(), days=1, client=True, server=True
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


def test_certificates_get_distinct_random_serials() -> None:
    ca_key = generate_key()
    ca = create_ca("lab", ca_key)
    public_key = generate_key().public_key()
    serials = {
        issue_certificate(ca, ca_key, "gw-1", public_key, days=1).serial_number for _ in range(5)
    }
    assert len(serials) == 5


def test_issue_refuses_a_certificate_for_no_use_or_no_time() -> None:
    ca_key = generate_key()
    ca = create_ca("lab", ca_key)
    public_key = generate_key().public_key()
    with pytest.raises(PkiError, match="client or server"):
        issue_certificate(ca, ca_key, "gw-1", public_key, days=1, client=False)
    with pytest.raises(PkiError, match="not positive"):
        issue_certificate(ca, ca_key, "gw-1", public_key, days=0)
    with pytest.raises(PkiError, match="not an IP address"):
        issue_certificate(
            ca, ca_key, "b", public_key, days=1, server=True, ip_addresses=["localhost"]
        )


# --- the lab ---------------------------------------------------------------------------


@pytest.mark.usefixtures("open_umask")
def test_make_lab_pki_writes_every_file_with_private_keys(tmp_path: Path) -> None:
    files = make_lab_pki(tmp_path / "lab", clients=["gw-1", "gw-2"])

    expected = {"ca.crt", "ca.key", "server.crt", "server.key"}
    expected |= {"gw-1.crt", "gw-1.key", "gw-2.crt", "gw-2.key"}
    assert set(os.listdir(tmp_path / "lab")) == expected
    for key in [files.ca_key, files.server_key, *(k for _, k in files.clients.values())]:
        assert _mode(key) == 0o600, key
    for cert in [files.ca_cert, files.server_cert, *(c for c, _ in files.clients.values())]:
        assert _mode(cert) == 0o644, cert


def test_lab_ca_and_broker_use_p256_and_clients_the_requested_kind(tmp_path: Path) -> None:
    files = make_lab_pki(tmp_path, clients=["gw-1"], client_key_kind="p256")
    for path in (files.ca_cert, files.server_cert, files.clients["gw-1"][0]):
        public_key = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert isinstance(public_key.curve, ec.SECP256R1)


def test_lab_broker_certificate_is_for_localhost_and_loopback(tmp_path: Path) -> None:
    files = make_lab_pki(tmp_path, clients=[])
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_lab_client_files_load_as_a_gateway_identity(tmp_path: Path, kind: str) -> None:
    files = make_lab_pki(tmp_path, clients=["kerb-17"], client_key_kind=kind)
    cert, key = files.clients["kerb-17"]
    identity = load_identity(key, cert, files.ca_cert)
    assert identity.gateway_id == "kerb-17"


@pytest.mark.parametrize("name", ["ca", "server", "a/b", ".hidden", ""])
def test_make_lab_pki_refuses_client_names_that_clash_or_escape(tmp_path: Path, name: str) -> None:
    with pytest.raises(PkiError):
        make_lab_pki(tmp_path / "lab", clients=[name])
    assert not (tmp_path / "lab").exists()


def test_make_lab_pki_refuses_repeated_names_and_unknown_key_kinds(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="repeat"):
        make_lab_pki(tmp_path / "lab", clients=["gw-1", "gw-1"])
    with pytest.raises(PkiError, match="unknown key kind"):
        make_lab_pki(tmp_path / "lab", clients=["gw-1"], client_key_kind="rsa")
    assert not (tmp_path / "lab").exists()
