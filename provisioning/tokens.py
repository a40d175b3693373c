"""One-time enrollment tokens, kept hashed in one crash-safe file, and lab claim certificates.

Operations make a token for one gateway id (`citygate provision token new`);
the technician types it into `citygate provision enroll`; the registrar redeems
it. A token is 160 random bits, shown once as eight groups of four base32
characters; the file keeps only its SHA-256 (a slow hash adds nothing against
160 bits of entropy), the gateway id it is bound to, its expiry, and once used,
when, for which request and for which key. A token is refused when it is
unknown, expired, bound to another gateway, or already used for another key;
the same key asking again (a reply lost on the way) gets the same certificate
again, not a second one.

The file is changed under an exclusive lock (`<file>.lock`), read-modify-write,
and replaced atomically (temporary file, fsync, rename, fsync of the
directory), so the registrar and the `token` command can run at once and a
power cut leaves the old or the new file, never a torn one.

`issue_claim` makes the bootstrap (claim) certificate of a gateway from a lab
claim CA: CN = gateway id, OU = `citygate claim`. The broker accepts it only on
its enrollment listener, where the ACL lets it do nothing but ask for a
certificate (docs/adr/0005). Lab tool; production uses the fleet's own CA.

Trust: the token file is the registrar's own; tokens typed by people are
normalised and only ever compared by hash.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity import is_valid_gateway_id, issued_by, public_key_of
from provisioning.labca import LabCa, load_ca
from provisioning.pki import write_file_atomically

FORMAT = "citygate enrollment tokens"
CRL_NAME = "crl.pem"
#: a CRL past its next update makes OpenSSL refuse every client: the registrar re-signs it daily
CRL_DAYS = 30
CLAIM_ROLE = "citygate claim"
LAB = "LAB TOOL, for tests and small labs"
_TOKEN_BYTES = 20


class TokenError(Exception):
    """The token file cannot be used; the message says what to do."""


class RevocationError(Exception):
    """The revocation list cannot be read or written; the message says what to do."""


class TokenRefused(Exception):
    """A token does not allow this enrollment; `code` for machines, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TokenRecord:
    digest: str  # SHA-256 of the normalised token, hex
    gateway_id: str
    created: float
    expires: float
    used_at: float | None = None
    request_id: str | None = None
    key_sha256: str | None = None  # the key it was used for
    serial: str | None = None  # the certificate issued for it, hex

    @property
    def token_id(self) -> str:
        """A short public name for the token (logs, `token list`)."""
        return self.digest[:8]


def normalise(token: str) -> str:
    """Upper case, without the dashes and spaces people type between the groups."""
    return "".join(token.split()).replace("-", "").upper()


def digest_of(token: str) -> str:
    return hashlib.sha256(normalise(token).encode("ascii", "replace")).hexdigest()


def _new_token() -> str:
    text = base64.b32encode(secrets.token_bytes(_TOKEN_BYTES)).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def _record(digest: str, body: dict[str, Any]) -> TokenRecord:
    used = body.get("used") or {}
    return TokenRecord(
        digest=digest,
        gateway_id=str(body["gateway"]),
        created=float(body["created"]),
        expires=float(body["expires"]),
        used_at=float(used["at"]) if used else None,
        request_id=used.get("request_id"),
        key_sha256=used.get("key_sha256"),
        serial=used.get("serial"),
    )


def _body(record: TokenRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "gateway": record.gateway_id,
        "created": record.created,
        "expires": record.expires,
        "used": None,
    }
    if record.used_at is not None:
        body["used"] = {
            "at": record.used_at,
            "request_id": record.request_id,
            "key_sha256": record.key_sha256,
            "serial": record.serial,
        }
    return body


class TokenStore:
    """The token file. Every method takes the lock and reads the file afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, TokenRecord]]:
        """The tokens under an exclusive lock; the caller's changes are written on exit."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise TokenError(f"cannot open {lock_path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = self._read()
            before = dict(records)
            yield records
            if records != before:
                self._write(records)
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, TokenRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise TokenError(f"cannot read the token file {self.path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TokenError(f"{self.path} is not a citygate token file")
        try:
            return {digest: _record(digest, body) for digest, body in data["tokens"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TokenError(f"the token file {self.path} is damaged ({exc!r})") from None

    def _write(self, records: dict[str, TokenRecord]) -> None:
        data = {
            "format": FORMAT,
            "version": 1,
            "tokens": {digest: _body(record) for digest, record in sorted(records.items())},
        }
        text = json.dumps(data, indent=1) + "\n"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_file_atomically(self.path, text.encode(), 0o600)

    def records(self) -> list[TokenRecord]:
        with self._locked() as records:
            return sorted(records.values(), key=lambda r: r.created)

    def issue(self, gateway_id: str, *, valid_s: float, now: float) -> tuple[str, TokenRecord]:
        """A new token for `gateway_id`; the token itself is returned here and never again."""
        if not is_valid_gateway_id(gateway_id):
            raise TokenError(
                f"{gateway_id!r} is not a valid gateway id (1-64 of A-Z a-z 0-9 . _ -)"
            )
        if valid_s <= 0:
            raise TokenError("a token must be valid for some time: pass a positive duration")
        token = _new_token()
        record = TokenRecord(digest_of(token), gateway_id, now, now + valid_s)
        with self._locked() as records:
            records[record.digest] = record
        return token, record

    def redeem(
        self, token: str, *, gateway_id: str, request_id: str, key_sha256: str, now: float
    ) -> TokenRecord:
        """Use the token for this gateway and key; TokenRefused says why not.

        The same key asking again gets the record back with the serial of the
        certificate already issued (if the issuing got that far).
        """
        digest = digest_of(token)
        with self._locked() as records:
            record = records.get(digest)
            if record is None:
                raise TokenRefused("token-unknown", "the enrollment token is not known")
            if record.gateway_id != gateway_id:
                raise TokenRefused(
                    "token-other-gateway", "the enrollment token was made for another gateway"
                )
            if record.used_at is not None:
                if record.key_sha256 == key_sha256:
                    return record
                used = datetime.fromtimestamp(record.used_at, UTC)
                raise TokenRefused(
                    "token-used",
                    f"the enrollment token was already used on {used:%Y-%m-%d %H:%M} UTC: "
                    "ask operations for a new one",
                )
            if now >= record.expires:
                ended = datetime.fromtimestamp(record.expires, UTC)
                raise TokenRefused(
                    "token-expired",
                    f"the enrollment token expired on {ended:%Y-%m-%d %H:%M} UTC: "
                    "ask operations for a new one",
                )
            used_record = TokenRecord(
                record.digest,
                record.gateway_id,
                record.created,
                record.expires,
                used_at=now,
                request_id=request_id,
                key_sha256=key_sha256,
            )
            records[digest] = used_record
            return used_record

    def record_serial(self, digest: str, serial: str) -> None:
        """Note the certificate issued for a redeemed token (for a repeated request)."""
        with self._locked() as records:
            record = records[digest]
            records[digest] = TokenRecord(
                record.digest,
                record.gateway_id,
                record.created,
                record.expires,
                record.used_at,
                record.request_id,
                record.key_sha256,
                serial,
            )


# -- the revocation list ----------------------------------------------------------------------


def _hash_for(ca: LabCa) -> hashes.SHA256 | None:
    return None if isinstance(ca.key, Ed25519PrivateKey) else hashes.SHA256()


def read_crl(ca: LabCa, path: Path) -> x509.CertificateRevocationList | None:
    """The CRL at `path` if the CA signed it; None when there is none."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RevocationError(f"cannot read the revocation list {path} ({exc})") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(public_key_of(ca.cert)):
        raise RevocationError(f"{path} is not a revocation list signed by the CA in {ca.directory}")
    return crl


def write_crl(
    ca: LabCa, path: Path, *, add: int | None = None, now: datetime | None = None
) -> x509.CertificateRevocationList:
    """Sign the CRL afresh (valid CRL_DAYS), with serial `add` revoked too; atomic."""
    moment = now or datetime.now(UTC)
    previous = read_crl(ca, path)
    revoked = list(previous) if previous is not None else []
    number = 1
    if previous is not None:
        with contextlib.suppress(x509.ExtensionNotFound):
            number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            number += 1
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(moment - timedelta(minutes=5))
        .next_update(moment + timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    if add is not None and all(entry.serial_number != add for entry in revoked):
        entry = x509.RevokedCertificateBuilder().serial_number(add).revocation_date(moment).build()
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, _hash_for(ca))
    write_file_atomically(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return crl


# -- lab claim certificates --------------------------------------------------------------


def issue_claim(claim_ca: LabCa, gateway_id: str, *, days: int) -> tuple[bytes, bytes]:
    """A claim key (PEM, PKCS#8) and certificate (PEM) for `gateway_id`, from a lab claim CA."""
    if not is_valid_gateway_id(gateway_id):
        raise TokenError(f"{gateway_id!r} is not a valid gateway id")
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, gateway_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CLAIM_ROLE),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(claim_ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    algorithm = None if isinstance(claim_ca.key, Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(claim_ca.key, algorithm)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


# -- the commands (added to `citygate provision` by provisioning.registrar) ---------------------


Handler = Callable[[argparse.Namespace], int]


def add_commands(actions: Any, translated: Callable[[Handler], Handler]) -> None:
    """`citygate provision token new|list` and `citygate provision revoke`."""
    token: argparse.ArgumentParser = actions.add_parser(
        "token",
        help="one-time enrollment tokens (operations side)",
        description="Make and list the one-time tokens that let a gateway enroll online. "
        "The token file keeps only their hashes.",
    )
    token_actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new: argparse.ArgumentParser = token_actions.add_parser(
        "new",
        help="make a token for one gateway (shown once)",
        description="Make a single-use token bound to one gateway id; it is printed once and "
        "only its hash is kept. With --claim-ca, also issue the gateway's claim certificate "
        f"({LAB}).",
    )
    new.add_argument("--tokens", type=Path, required=True, metavar="FILE", help="the token file")
    new.add_argument("--gateway-id", required=True, metavar="ID", help="the gateway it is for")
    new.add_argument(
        "--valid-hours", type=float, default=72.0, metavar="H", help="lifetime (default 72)"
    )
    new.add_argument("--json", action="store_true", help="print a JSON object")
    new.add_argument("--claim-ca", type=Path, metavar="DIR", help=f"a claim CA ({LAB})")
    new.add_argument(
        "--out", type=Path, metavar="DIR", help="with --claim-ca: where to write claim.key/.crt"
    )
    new.add_argument("--claim-days", type=int, default=365, metavar="N", help="default 365")
    new.set_defaults(handler=translated(_cmd_token_new))

    listing: argparse.ArgumentParser = token_actions.add_parser(
        "list", help="list the tokens (never the tokens themselves)"
    )
    listing.add_argument("--tokens", type=Path, required=True, metavar="FILE")
    listing.add_argument("--json", action="store_true", help="one JSON object per token")
    listing.set_defaults(handler=translated(_cmd_token_list))

    revoke: argparse.ArgumentParser = actions.add_parser(
        "revoke",
        help="revoke a gateway certificate (adds it to the CA's CRL)",
        description="Add a certificate to the CA's revocation list (CRL). The broker refuses "
        "it once it has re-read the CRL (send it SIGHUP); the registrar never renews it.",
    )
    revoke.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA directory")
    revoke.add_argument("cert", metavar="CERT|SERIAL", help="certificate file, or serial in hex")
    revoke.add_argument("--crl", type=Path, metavar="FILE", help=f"default: DIR/{CRL_NAME}")
    revoke.set_defaults(handler=translated(_cmd_revoke))


def _when(moment: float) -> str:
    return f"{datetime.fromtimestamp(moment, UTC):%Y-%m-%d %H:%M} UTC"


def _cmd_token_new(args: argparse.Namespace) -> int:
    if (args.claim_ca is None) != (args.out is None):
        raise TokenError("--claim-ca and --out go together: pass both or neither")
    store = TokenStore(Path(args.tokens))
    token, record = store.issue(args.gateway_id, valid_s=args.valid_hours * 3600, now=time.time())
    claim = None
    if args.claim_ca is not None:
        key_pem, cert_pem = issue_claim(
            load_ca(Path(args.claim_ca)), args.gateway_id, days=args.claim_days
        )
        out = Path(args.out)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_file_atomically(out / "claim.key", key_pem, 0o600)
        write_file_atomically(out / "claim.crt", cert_pem, 0o644)
        claim = out / "claim.crt"
    if args.json:
        body = {
            "token": token,
            "gateway": record.gateway_id,
            "id": record.token_id,
            "expires": record.expires,
        }
        if claim is not None:
            body["claim_cert"] = str(claim)
        print(json.dumps(body))
        return 0
    until = _when(record.expires)
    print(f"token {record.token_id} for {record.gateway_id}, single use, valid until {until}:")
    print(token)
    if claim is not None:
        print(f"claim certificate {claim} and its key {claim.with_suffix('.key')}")
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    now = time.time()
    for record in TokenStore(Path(args.tokens)).records():
        if record.used_at is not None:
            state = f"used {_when(record.used_at)}" + (
                f", certificate {record.serial}" if record.serial else ""
            )
        elif now >= record.expires:
            state = f"expired {_when(record.expires)}"
        else:
            state = f"valid until {_when(record.expires)}"
        if args.json:
            print(json.dumps({"id": record.token_id, "gateway": record.gateway_id, "state": state}))
        else:
            print(f"{record.token_id}  {record.gateway_id:<20} {state}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    ca = load_ca(Path(args.ca))
    crl_path = Path(args.crl) if args.crl else ca.directory / CRL_NAME
    given = Path(args.cert)
    if given.is_file():
        try:
            cert = x509.load_pem_x509_certificate(given.read_bytes())
        except ValueError:
            raise RevocationError(f"{given} is not a PEM certificate") from None
        if not issued_by(cert, ca.cert):
            raise RevocationError(f"{given} was not issued by the CA in {ca.directory}")
        serial, what = (
            cert.serial_number,
            f"{cert.subject.rfc4514_string()} (serial {cert.serial_number:x})",
        )
    else:
        try:
            serial = int(args.cert.replace(":", ""), 16)
        except ValueError:
            raise RevocationError(
                f"{args.cert!r} is neither a certificate file nor a hex serial"
            ) from None
        what = f"serial {serial:x}"
    write_crl(ca, crl_path, add=serial)
    print(f"revoked {what}; the revocation list is {crl_path}")
    print(
        "next: make the broker re-read it (mosquitto: kill -HUP PID); "
        "a gateway that is connected stays connected until it reconnects"
    )
    return 0
