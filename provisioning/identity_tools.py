"""The gateway's identity on the device: its key, its CSR and its installed certificate.

`generate_device_key` makes the key where it will live (it never leaves the
device, is never printed, and is written with mode 0600 from the moment the
file exists, owned by the service user when asked); `build_csr` asks a CA for
a certificate whose CN is the gateway id and whose subject carries the
hardware serial number where the board has one; `install_certificate` installs
the certificate only after the very checks the agent makes at start-up
(`agent.identity.load_identity`) have passed against the configured key and CA.

Every file is replaced atomically (temporary file, fsync, rename, fsync of the
directory) and the file it replaces is kept as `<name>.old` (a hard link made
before the rename), so a power cut at any moment leaves either the old or the
new file under the configured name, never a torn one and never none.

Trust: the certificate and chain files come from outside (a USB stick, a
laptop) and are untrusted until `load_identity` accepts them. The config file
is trusted once `agent.config` has checked it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.config import IdentityConfig, load_config
from agent.identity import Identity, is_valid_gateway_id, issued_by, load_identity
from agent.keys import PrivateKey, kid_for
from provisioning.pki import Owner, fsync_directory, generate_key, write_file_atomically

DEFAULT_CONFIG = Path("/etc/citygate/gateway.toml")
SERVICE_USER = "citygate"
DEFAULT_KEY_NAME = "gateway.key"
#: where Linux exposes the board's serial number (Raspberry Pi and other device-tree boards);
#: /etc/machine-id is not one: it is regenerated with every fresh image
SERIAL_SOURCES = (
    Path("/proc/device-tree/serial-number"),
    Path("/sys/firmware/devicetree/base/serial-number"),
)

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700
# X.520 serialNumber is a PrintableString of at most 64 characters
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]{1,64}")


class ProvisionError(Exception):
    """A provisioning step cannot be done; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class NewKey:
    path: Path
    kind: str  # "Ed25519" or "ECDSA P-256"
    kid: str  # hex key id (public: it is in every signed message)
    old: Path | None  # where the replaced key was kept
    owner: Owner | None


@dataclass(frozen=True)
class Installed:
    identity: Identity
    old: Path | None  # where the replaced certificate was kept
    chain: int  # CA certificates installed after the gateway certificate
    changed: bool  # False when exactly this certificate was installed already
    ca_installed: bool = False  # the CA bundle was installed too (first enrollment)


# -- the config ------------------------------------------------------------------------


def identity_paths(config: Path) -> IdentityConfig:
    """The [identity] paths of a gateway config; ConfigError if the config is unusable."""
    return load_config(config).identity


# -- files -----------------------------------------------------------------------------


def keep_old(path: Path) -> Path | None:
    """Keep the file at `path` as `<name>.old` (replacing an older one); None if no file.

    A hard link, made under a temporary name and renamed: the file stays under its
    own name throughout, and `.old` is always a complete earlier version.
    """
    if not path.exists():
        return None
    old = path.with_name(path.name + ".old")
    staged = path.parent / f".{path.name}.old.{secrets.token_hex(8)}.tmp"
    os.link(path, staged)
    try:
        os.replace(staged, old)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise
    fsync_directory(path.parent)
    return old


def resolve_owner(name: str | None) -> Owner | None:
    """The key's owner: `name` if given; else the service user when run as root and it exists."""
    if name is None:
        if os.geteuid() != 0:
            return None
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(SERVICE_USER)
            return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ProvisionError(
            f"there is no user {name!r} on this gateway: create it, or pass the user "
            "the service runs as with --owner"
        ) from None
    if os.geteuid() not in (0, entry.pw_uid):
        raise ProvisionError(f"only root can give the key to user {name!r}: run it with sudo")
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


# -- the key ---------------------------------------------------------------------------


def describe_key(key: PrivateKey) -> str:
    return "Ed25519" if isinstance(key, Ed25519PrivateKey) else "ECDSA P-256"


def generate_device_key(
    path: Path, *, kind: str = "ed25519", force: bool = False, owner: Owner | None = None
) -> NewKey:
    """Generate the gateway key into `path` (0600); refuse to replace one unless `force`."""
    if (path.exists() or path.is_symlink()) and not force:
        raise ProvisionError(
            f"{path} already holds a key: keep it (make a CSR with `citygate provision csr`), "
            f"or pass --force to replace it (the old key is kept as {path.name}.old)"
        )
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ProvisionError(f"{path} is not a regular file: remove it or choose another --out")
    directory = path.parent
    if not directory.is_dir():
        directory.mkdir(mode=_DIR_MODE, parents=True)
        if owner is not None:
            os.chown(directory, owner.uid, owner.gid)
    key = generate_key(kind)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    old = keep_old(path)
    write_file_atomically(path, pem, _KEY_MODE, owner)
    return NewKey(path, describe_key(key), kid_for(key.public_key()).hex(), old, owner)


def load_device_key(path: Path) -> PrivateKey:
    """The gateway key at `path`, refused (like the agent does) if others may read it."""
    try:
        with path.open("rb") as stream:
            mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
            if mode & 0o077:
                raise ProvisionError(
                    f"key file {path} is readable by group/others (mode {mode:04o}): "
                    f"run chmod 600 {path}"
                )
            data = stream.read()
    except FileNotFoundError:
        raise ProvisionError(
            f"there is no key at {path}: generate one with `citygate provision keygen`"
        ) from None
    except OSError as exc:
        raise ProvisionError(
            f"cannot read key file {path} ({exc.strerror}): run it as root"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise ProvisionError(
            f"{path} is not an unencrypted PEM private key: generate one with "
            "`citygate provision keygen --force`"
        ) from None
    if isinstance(key, Ed25519PrivateKey) or (
        isinstance(key, EllipticCurvePrivateKey) and isinstance(key.curve, SECP256R1)
    ):
        return key
    raise ProvisionError(
        f"{path} is not an Ed25519 or ECDSA P-256 key: generate one with "
        "`citygate provision keygen --force`"
    )


# -- the CSR ---------------------------------------------------------------------------


def usable_serial(text: str) -> bool:
    """True when `text` can be a certificate serialNumber attribute (PrintableString)."""
    return _PRINTABLE.fullmatch(text) is not None


def hardware_serial(sources: tuple[Path, ...] = SERIAL_SOURCES) -> str | None:
    """The board's serial number from the device tree, or None where there is none."""
    for source in sources:
        try:
            raw = source.read_bytes()
        except OSError:
            continue
        text = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
        if text and usable_serial(text):
            return text
    return None


def build_csr(
    key: PrivateKey, gateway_id: str, serial: str | None
) -> x509.CertificateSigningRequest:
    """A CSR signed by `key`: CN = gateway id, serialNumber = `serial` when given."""
    if not is_valid_gateway_id(gateway_id):
        raise ProvisionError(
            f"{gateway_id!r} is not a valid gateway id "
            "(1-64 characters of A-Z a-z 0-9 . _ -; no spaces, '/', '+' or '#')"
        )
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]
    if serial is not None:
        if not usable_serial(serial):
            raise ProvisionError(
                f"serial number {serial!r} cannot go into a certificate "
                "(at most 64 of A-Z a-z 0-9 space ' ( ) + , - . / : = ?)"
            )
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    algorithm = None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    return builder.sign(key, algorithm)


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


# -- the certificate ------------------------------------------------------------------


def _read_pem_certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProvisionError(f"{what} {path} does not exist: check the path") from None
    except OSError as exc:
        raise ProvisionError(f"cannot read {what} {path} ({exc.strerror})") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ProvisionError(
            f"{what} {path} holds no PEM certificate: ask for the PEM (text) file"
        ) from None


def subject_text(cert: x509.Certificate) -> str:
    """The certificate's subject for people: CN=..., serialNumber=..."""
    return cert.subject.rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})


def _check_chain(leaf: x509.Certificate, chain: list[x509.Certificate], path: Path) -> None:
    previous = leaf
    for cert in chain:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ProvisionError(
                f"chain file {path} holds {subject_text(cert)!r}, which is not a "
                "CA certificate: pass only the CA certificates that issued this one"
            )
        if not issued_by(previous, cert):
            raise ProvisionError(
                f"chain file {path}: {subject_text(previous)!r} was not issued by "
                f"{subject_text(cert)!r}: list the CA certificates in order, "
                "the issuer of the gateway certificate first"
            )
        previous = cert


def _first_ca_bundle(ca_file: Path, configured: Path) -> bytes | None:
    """The bundle to install at `configured` on a first enrollment; None if already there.

    Only where no bundle is installed yet: replacing a trust anchor that is in
    place is not a technician's step (a gateway that moves to another fleet is
    re-imaged, or operations remove the old bundle on purpose).
    """
    cas = _read_pem_certificates(ca_file, "CA file")
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)
    try:
        present = configured.read_bytes()
    except FileNotFoundError:
        return data
    except OSError as exc:
        raise ProvisionError(f"cannot read the CA bundle {configured} ({exc.strerror})") from None
    with contextlib.suppress(ValueError):
        if x509.load_pem_x509_certificates(present) == cas:
            return None
    raise ProvisionError(
        f"another CA bundle is installed at {configured}: the certificate must come from "
        "that CA; leave out --ca (a trust anchor in place is replaced by operations, not here)"
    )


def install_certificate(
    cert_file: Path,
    paths: IdentityConfig,
    *,
    chain_file: Path | None = None,
    ca_file: Path | None = None,
) -> Installed:
    """Check `cert_file` as the agent would, then install it (and `chain_file`) atomically.

    The agent's own checks run on the given file with the configured key and CA:
    the key's permissions, the certificate matching the key, its validity period,
    its issuer being a CA of the configured bundle, its CN being a gateway id.
    With `ca_file` on a gateway that has no CA bundle yet, that file is checked
    as the bundle and installed first.
    """
    certificates = _read_pem_certificates(cert_file, "certificate file")
    bundle = _first_ca_bundle(ca_file, paths.ca) if ca_file is not None else None
    anchor = ca_file if bundle is not None and ca_file is not None else paths.ca
    identity = load_identity(paths.key, cert_file, anchor)  # IdentityError says what to do
    chain = _read_pem_certificates(chain_file, "chain file") if chain_file else []
    if chain_file is not None:
        _check_chain(identity.certificate, chain, chain_file)
    elif len(certificates) > 1:
        chain = certificates[1:]
        _check_chain(identity.certificate, chain, cert_file)
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [certificates[0], *chain])
    if bundle is not None:  # first the anchor: a power cut after it leaves a re-runnable state
        paths.ca.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_file_atomically(paths.ca, bundle, _CERT_MODE)
    target = paths.cert
    with contextlib.suppress(OSError):
        if target.read_bytes() == data:
            identity = load_identity(paths.key, target, paths.ca)
            return Installed(identity, None, len(chain), False, ca_installed=bundle is not None)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    old = keep_old(target)
    write_file_atomically(target, data, _CERT_MODE)
    installed = load_identity(paths.key, target, paths.ca)
    return Installed(installed, old, len(chain), True, ca_installed=bundle is not None)
