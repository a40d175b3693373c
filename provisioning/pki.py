"""A lab PKI: a throwaway CA, a broker certificate and gateway client certificates.

This is for tests, demos and small labs only. A production fleet uses an existing
CA (an enterprise PKI, a cloud IoT CA, an HSM-backed issuing CA); nothing here
protects the CA key beyond file permissions, and certificates are issued without
any policy, revocation or audit trail.

What it does guarantee: private keys are written unencrypted as PKCS#8 PEM with
mode 0600 from the moment the file exists (never world-readable, not even briefly),
and every file is replaced atomically (temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old file or the new one.

Trust: callers pass the names, keys and validity periods; they are used as given.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity import is_valid_gateway_id, public_key_of
from agent.keys import PrivateKey, PublicKey

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_CLOCK_SKEW = timedelta(minutes=5)
_RESERVED_NAMES = frozenset({"ca", "server"})


class PkiError(Exception):
    """A lab PKI request cannot be honoured (bad key kind, bad name, bad period)."""


@dataclass(frozen=True)
class LabFiles:
    """Where `make_lab_pki` put its files; `clients` maps a name to (cert, key)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]


def generate_key(kind: str = "ed25519") -> PrivateKey:
    """A new private key: kind "ed25519" (the default) or "p256" (ECDSA on P-256)."""
    if kind == "ed25519":
        return Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiError(f"unknown key kind {kind!r}: use 'ed25519' or 'p256'")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Owner:
    """The user that must own the key file (the service user), by uid and primary gid."""

    name: str
    uid: int
    gid: int


def write_file_atomically(path: Path, data: bytes, mode: int, owner: Owner | None = None) -> None:
    """Replace `path` with `data`: mode (and owner) set before the name appears, fsynced."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            try:
                os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 certificates)
            except PermissionError:
                if not mode & 0o044:
                    raise
                # a public file (CSR, certificate) on a USB stick: FAT has no modes to set
            if owner is not None:
                os.fchown(fd, owner.uid, owner.gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_directory(path.parent)


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600 from the start, atomically."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file_atomically(path, pem, _KEY_MODE)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write `cert` as PEM, mode 0644, atomically."""
    write_file_atomically(path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _hash_for(signing_key: PrivateKey) -> hashes.SHA256 | None:
    """Ed25519 signs without a separate hash; ECDSA signs with SHA-256."""
    return None if isinstance(signing_key, Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str, serial_number: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if serial_number is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    return x509.Name(attributes)


def _period(days: int) -> tuple[datetime, datetime]:
    if days <= 0:
        raise PkiError(f"validity of {days} days is not positive: pass days >= 1")
    now = datetime.now(UTC)
    return now - _CLOCK_SKEW, now + timedelta(days=days)


def create_ca(common_name: str, key: PrivateKey, *, days: int = 3650) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates only."""
    not_before, not_after = _period(days)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(key, _hash_for(key))


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key_of(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _subject_alt_names(
    dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> x509.SubjectAlternativeName | None:
    entries: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for text in ip_addresses:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError as exc:
            raise PkiError(f"{text!r} is not an IP address: pass it as a DNS name") from exc
    return x509.SubjectAlternativeName(entries) if entries else None


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    public_key: PublicKey,
    *,
    days: int,
    client: bool = True,
    server: bool = False,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    serial_number: str | None = None,
) -> x509.Certificate:
    """An end-entity certificate for `public_key`, signed by the CA, for TLS client/server.

    The subject is the common name, plus the device's hardware serial number when given.
    """
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if not usages:
        raise PkiError("a certificate must be for client or server use: set client or server")
    not_before, not_after = _period(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, serial_number))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    alt_names = _subject_alt_names(dns_names, ip_addresses)
    if alt_names is not None:
        builder = builder.add_extension(alt_names, critical=False)
    return builder.sign(ca_key, _hash_for(ca_key))


def _check_client_names(clients: Sequence[str]) -> None:
    for name in clients:
        if not is_valid_gateway_id(name) or name.startswith("."):
            raise PkiError(
                f"client name {name!r} is not a valid gateway id "
                "(1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.')"
            )
        if name in _RESERVED_NAMES:
            raise PkiError(f"client name {name!r} would overwrite the lab's {name} files")
    if len(set(clients)) != len(clients):
        raise PkiError("client names repeat: give each client a distinct name")


def make_lab_pki(
    directory: Path,
    *,
    clients: Sequence[str],
    server_names: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1",),
    client_key_kind: str = "ed25519",
    days: int = 30,
) -> LabFiles:
    """Create a CA, a broker certificate and one client certificate per name in `directory`.

    The CA and the broker use ECDSA P-256 keys (the widest TLS support); clients get
    `client_key_kind` keys and their name as common name.
    """
    _check_client_names(clients)
    generate_key(client_key_kind)  # reject an unknown kind before writing anything
    directory.mkdir(parents=True, exist_ok=True)

    ca_key = generate_key("p256")
    ca_cert = create_ca("citygate lab CA", ca_key, days=days + 1)
    files = LabFiles(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        clients={name: (directory / f"{name}.crt", directory / f"{name}.key") for name in clients},
    )
    write_private_key(files.ca_key, ca_key)
    write_certificate(files.ca_cert, ca_cert)

    server_key = generate_key("p256")
    server_common_name = server_names[0] if server_names else "citygate lab broker"
    server_cert = issue_certificate(
        ca_cert,
        ca_key,
        server_common_name,
        server_key.public_key(),
        days=days,
        client=False,
        server=True,
        dns_names=server_names,
        ip_addresses=server_ips,
    )
    write_private_key(files.server_key, server_key)
    write_certificate(files.server_cert, server_cert)

    for name, (cert_path, key_path) in files.clients.items():
        client_key = generate_key(client_key_kind)
        cert = issue_certificate(ca_cert, ca_key, name, client_key.public_key(), days=days)
        write_private_key(key_path, client_key)
        write_certificate(cert_path, cert)
    return files
