"""Certificate renewal, the agent's side, and the enrollment wire format it shares.

The enrollment protocol (docs/adr/0005): a gateway publishes an `EnrollRequest`
(JSON) on `<prefix>/<gw>/enroll/request` and the registrar answers with an
`EnrollReply` on `<prefix>/<gw>/enroll/reply`, both QoS 1, matched by a random
request id. A first enrollment carries a one-time token (`provisioning.enroll`);
a renewal carries the current certificate and a proof: a signature by the
current key over the gateway id, the request id and the CSR's hash.

`Rotation.run` is one task of the agent's TaskGroup. It warns in the log when
the certificate has less than `WARN_DAYS` left (at start, then daily); once
`renew_at_fraction` of the lifetime has passed it makes a new key beside the
current one (`<key>.new`, mode 0600), sends its CSR over the agent's own
session, checks the certificate that comes back exactly as the agent checks its
credentials at start (`load_identity`) and stages it as `<cert>.new`; then it
sets `staged`, and the service restarts itself around `adopt_staged`: a trial
connection with the staged pair, and only when the broker accepted it, the
swap (the previous pair kept as `.old`). A failure at any step keeps the
current credential and tries again later with a growing delay.

Power cuts: every file is written whole (temporary file, fsync, rename, fsync
of the directory). Until the swap only `.new` files change; during the swap
the key is replaced before the certificate, and `recover_identity`, called
before the agent loads its identity, finishes a swap that a power cut
interrupted. At no moment is there no working key and certificate pair.

Trust: a reply is untrusted until `load_identity` accepts its certificate for
the staged key and the configured CA bundle. The broker's ACL lets only the
registrar (and the gateway itself) write a gateway's reply topic.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from agent.backoff import Backoff
from agent.config import Config
from agent.durable import fsync_directory, write_atomically
from agent.identity import Identity, IdentityError, is_valid_gateway_id, load_identity
from agent.keys import PrivateKey, PublicKey, spki_der
from agent.mqtt import (
    ConnectFailed,
    PublishRefused,
    Session,
    SessionLost,
    SessionSettings,
)
from agent.seq import SeqCounter, SeqError
from agent.tls import client_context

log = logging.getLogger(__name__)

PROTOCOL = 1
RENEW_AT_FRACTION = 0.667
WARN_DAYS = 30
REPLY_TIMEOUT_S = 60.0
#: the loop looks at the clock at least this often (a gateway's clock may jump when NTP sets it)
CHECK_EVERY_S = 3600.0
WARN_EVERY_S = 86400.0
#: delays between failed renewals: one minute, doubling, at most six hours
RETRY = Backoff(60.0, 6 * 3600.0)
MAX_PAYLOAD = 16 * 1024
#: replies held while a renewal waits for its own (others' are read and ignored)
REPLY_QUEUE = 8
STAGED = ".new"
OLD = ".old"
#: the retry state that must survive the service's restart (and the agent's)
HOLD_FILE = "rotation.json"

_REQUEST_ID = re.compile(r"[0-9a-f]{16,64}")
_PROOF_LABEL = b"citygate renewal v1"

Checkpoint = Callable[[str], None]


def _no_checkpoint(step: str) -> None:
    log.debug("rotation: %s", step)


class ProtocolError(Exception):
    """An enrollment message is malformed."""


class RenewalError(Exception):
    """This renewal attempt failed; the current credential stays in use."""


# -- the wire format ----------------------------------------------------------------------


def request_topic(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/enroll/request"


def reply_topic(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/enroll/reply"


def new_request_id() -> str:
    return secrets.token_hex(16)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"field {key!r} must be a non-empty string")
    return value


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else _text(body, key)


def _load_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"message of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("not a JSON object") from None
    if not isinstance(body, dict):
        raise ProtocolError("not a JSON object")
    if body.get("v") != PROTOCOL:
        raise ProtocolError(f"protocol version {body.get('v')!r}, expected {PROTOCOL}")
    return body


def _request_id(body: dict[str, Any]) -> str:
    value = _text(body, "request_id")
    if not _REQUEST_ID.fullmatch(value):
        raise ProtocolError("request_id must be 16 to 64 lower-case hex digits")
    return value


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """A CSR for the registrar: with a `token` (enrollment) or a `certificate` and `proof`."""

    gateway_id: str
    request_id: str
    csr_pem: str
    token: str | None = None
    certificate_pem: str | None = None  # renewal: the certificate in use
    proof: bytes | None = None  # renewal: signature by the key in use, see `proof_message`

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL,
            "gateway": self.gateway_id,
            "request_id": self.request_id,
            "csr": self.csr_pem,
        }
        if self.token is not None:
            body["token"] = self.token
        if self.certificate_pem is not None and self.proof is not None:
            body["certificate"] = self.certificate_pem
            body["proof"] = base64.b64encode(self.proof).decode("ascii")
        return _dump(body)

    @classmethod
    def decode(cls, payload: bytes) -> EnrollRequest:
        body = _load_json(payload)
        request_id = _request_id(body)
        gateway_id = _text(body, "gateway")
        if not is_valid_gateway_id(gateway_id):
            raise ProtocolError(f"gateway {gateway_id[:70]!r} is not a valid gateway id")
        csr = _text(body, "csr")
        token = _optional_text(body, "token")
        certificate = _optional_text(body, "certificate")
        proof_text = _optional_text(body, "proof")
        if (token is None) == (certificate is None) or (certificate is None) != (
            proof_text is None
        ):
            raise ProtocolError("a request carries either a token or a certificate and a proof")
        proof = None
        if proof_text is not None:
            try:
                proof = base64.b64decode(proof_text, validate=True)
            except ValueError:
                raise ProtocolError("proof is not base64") from None
        return cls(gateway_id, request_id, csr, token, certificate, proof)


@dataclass(frozen=True, slots=True)
class EnrollReply:
    """The registrar's answer: a certificate (PEM), or an error code and a sentence."""

    request_id: str
    certificate_pem: str | None = None
    error: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.certificate_pem is not None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": PROTOCOL, "request_id": self.request_id, "ok": self.ok}
        if self.certificate_pem is not None:
            body["certificate"] = self.certificate_pem
        else:
            body["error"] = self.error or "refused"
            body["message"] = self.message
        return _dump(body)

    @classmethod
    def decode(cls, payload: bytes) -> EnrollReply:
        body = _load_json(payload)
        request_id = _request_id(body)
        if body.get("ok") is True:
            return cls(request_id, certificate_pem=_text(body, "certificate"))
        error = _text(body, "error")
        message = body.get("message")
        return cls(request_id, error=error, message=message if isinstance(message, str) else "")


def proof_message(gateway_id: str, request_id: str, csr_der: bytes) -> bytes:
    """What a renewal's proof signs: binds the current key to this gateway, request and CSR."""
    parts = [
        _PROOF_LABEL,
        gateway_id.encode(),
        request_id.encode(),
        hashlib.sha256(csr_der).digest(),
    ]
    return b"\0".join(parts)


def sign_proof(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def proof_is_valid(public_key: PublicKey, message: bytes, proof: bytes) -> bool:
    try:
        if isinstance(public_key, Ed25519PublicKey):
            public_key.verify(proof, message)
        else:
            public_key.verify(proof, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


async def exchange(
    session: Session,
    prefix: str,
    request: EnrollRequest,
    timeout_s: float,
    *,
    on_sent: Callable[[], None] | None = None,
) -> EnrollReply:
    """Publish `request` and wait for the reply with its request id.

    Raises TimeoutError, SessionLost, or PublishRefused (the broker's ACL does
    not let this client write the gateway's request topic).
    """
    topic = reply_topic(prefix, request.gateway_id)
    async with asyncio.timeout(timeout_s):
        # the inbox is there before the subscription, which may bring a retained reply at once
        with session.inbox(topic, maxsize=REPLY_QUEUE) as replies:
            await session.subscribe(topic)
            await session.publish(request_topic(prefix, request.gateway_id), request.encode())
            if on_sent is not None:
                on_sent()
            while True:
                message = await replies.get()  # SessionLost when the connection drops
                try:
                    reply = EnrollReply.decode(message.payload)
                except ProtocolError as exc:
                    log.warning("ignoring a malformed reply on %s: %s", topic, exc)
                    continue
                if reply.request_id == request.request_id:
                    return reply


# -- when --------------------------------------------------------------------------------


def renewal_due(cert: x509.Certificate, fraction: float) -> datetime:
    """The moment `fraction` of the certificate's lifetime has passed."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


def expiry_warning(cert: x509.Certificate, now: datetime, *, days: int = WARN_DAYS) -> str | None:
    """A sentence for the log when fewer than `days` days are left, else None."""
    left = cert.not_valid_after_utc - now
    end = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if left.total_seconds() <= 0:
        return f"the gateway certificate expired on {end}: the broker will refuse it; renew it"
    if left.days >= days:
        return None
    return (
        f"the gateway certificate expires on {end} ({left.days} days left): automatic renewal "
        "keeps trying unless [rotation] renew = false; to renew by hand see docs/technician.md"
    )


# -- files -----------------------------------------------------------------------------------


def staged_paths(key: Path, cert: Path) -> tuple[Path, Path]:
    return key.with_name(key.name + STAGED), cert.with_name(cert.name + STAGED)


def _keep_old(path: Path) -> None:
    """Keep `path` as `<name>.old` (a hard link; the file stays under its own name)."""
    staged = path.parent / f".{path.name}{OLD}.{secrets.token_hex(8)}.tmp"
    try:
        os.link(path, staged)
    except PermissionError:  # fs.protected_hardlinks: e.g. a certificate root installed
        write_atomically(
            path.with_name(path.name + OLD), path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
        )
        return
    try:
        os.replace(staged, path.with_name(path.name + OLD))
    finally:
        # rename(2) does nothing when both names are links of one file (`.old` kept already
        # by an attempt a power cut interrupted): the staged name would stay behind
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    fsync_directory(path.parent)


def _pair_matches(key_path: Path, cert_path: Path) -> bool:
    """True when the certificate file is for the key in the key file (nothing else checked)."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ours = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return ours == theirs


def _read_private_key(path: Path) -> PrivateKey | None:
    """An Ed25519 or P-256 key from a file only its owner may read; None otherwise."""
    try:
        with path.open("rb") as stream:
            if os.fstat(stream.fileno()).st_mode & 0o077:
                return None
            key = serialization.load_pem_private_key(stream.read(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if isinstance(key, Ed25519PrivateKey) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    return None


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_identity(key: Path, cert: Path) -> str | None:
    """Finish a swap a power cut interrupted; returns what was done, or None (nothing to do).

    Call it before loading the identity. The swap replaces the key, then the
    certificate: if the key is the new one and the certificate still the old,
    the staged certificate is moved in. If instead the previous key matches
    the certificate, it is put back. Anything else is left for
    `load_identity` to report.
    """
    if not key.exists() or not cert.exists() or _pair_matches(key, cert):
        return None
    _, cert_new = staged_paths(key, cert)
    if _pair_matches(key, cert_new):
        os.replace(cert_new, cert)
        fsync_directory(cert.parent)
        return f"finished an interrupted certificate swap: {cert} now holds the renewed certificate"
    old_key = key.with_name(key.name + OLD)
    if _pair_matches(old_key, cert):
        restored = key.parent / f".{key.name}.{secrets.token_hex(8)}.tmp"
        os.link(old_key, restored)
        os.replace(restored, key)
        fsync_directory(key.parent)
        return f"undid an interrupted key swap: {key} holds the key of {cert} again"
    return None


# -- the retry state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hold:
    """Failed attempts so far and the wall-clock time before which none is tried again."""

    attempts: int = 0
    retry_at: float = 0.0


def read_hold(state_dir: Path) -> Hold:
    try:
        body = json.loads((state_dir / HOLD_FILE).read_text())
        return Hold(int(body["attempts"]), float(body["retry_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Hold()


def _write_hold(state_dir: Path, hold: Hold) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(
            state_dir / HOLD_FILE,
            _dump({"attempts": hold.attempts, "retry_at": hold.retry_at}),
            0o644,
        )
    except OSError as exc:
        log.warning("cannot write %s: %s", state_dir / HOLD_FILE, exc)


def failed_attempt(
    state_dir: Path,
    *,
    retry: Backoff = RETRY,
    now: float | None = None,
    rand: random.Random | None = None,
) -> float:
    """Count one failed renewal in the state directory; returns the time of the next one."""
    hold = read_hold(state_dir)
    moment = time.time() if now is None else now
    retry_at = moment + retry.delay(hold.attempts, rand or random.Random())
    _write_hold(state_dir, Hold(hold.attempts + 1, retry_at))
    return retry_at


def _clear_hold(state_dir: Path) -> None:
    _discard(state_dir / HOLD_FILE)


# -- the task -------------------------------------------------------------------------------------


def _new_key_like(key: PrivateKey) -> PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _csr(key: PrivateKey, subject: x509.Name) -> x509.CertificateSigningRequest:
    """A CSR with the current certificate's CN and serialNumber, signed by the new key."""
    keep = [
        attribute
        for attribute in subject
        if attribute.oid in (NameOID.COMMON_NAME, NameOID.SERIAL_NUMBER)
    ]
    algorithm = None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name(keep)).sign(key, algorithm)
    )


class Rotation:
    """Renews the agent's certificate in time and warns before it expires.

    `sessions` returns a live MQTT session (the uplink's). When a renewed
    certificate is staged, `staged` is set and `run` returns: the owner then
    stops the service and calls `adopt_staged`.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        prefix: str,
        sessions: Callable[[], Awaitable[Session]],
        state_dir: Path,
        enabled: bool = True,
        renew_at_fraction: float = RENEW_AT_FRACTION,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        retry: Backoff = RETRY,
        clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint = _no_checkpoint,
    ) -> None:
        self.identity = identity
        self.staged = asyncio.Event()
        self._prefix = prefix
        self._sessions = sessions
        self._state_dir = state_dir
        self._enabled = enabled
        self._fraction = renew_at_fraction
        self._reply_timeout_s = reply_timeout_s
        self._retry = retry
        self._clock = clock
        self._checkpoint = checkpoint
        self._warned_at: float | None = None
        self._retry_at = read_hold(state_dir).retry_at  # failed attempts also count across restarts

    @property
    def due(self) -> datetime:
        return renewal_due(self.identity.certificate, self._fraction)

    def warn_if_expiring(self, now: float) -> str | None:
        """Log the expiry warning at the first call and then at most once a day."""
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_S:
            return None
        warning = expiry_warning(self.identity.certificate, datetime.fromtimestamp(now, UTC))
        if warning is not None:
            self._warned_at = now
            expired = self.identity.certificate.not_valid_after_utc.timestamp() <= now
            log.log(logging.ERROR if expired else logging.WARNING, "%s", warning)
        return warning

    def next_step(self, now: float) -> float:
        """Seconds to wait before the next renewal attempt; 0 when one is due now."""
        if not self._enabled:
            return CHECK_EVERY_S
        wait = max(self.due.timestamp() - now, 0.0)
        held = self._retry_at - now
        if held <= self._retry.max_s:  # a longer hold comes from a clock that jumped back
            wait = max(wait, held)
        return min(wait, CHECK_EVERY_S)

    async def run(self) -> None:
        if self._enabled and self.staged_identity() is not None:
            log.info("a renewed certificate is staged: switching to it")
            self.staged.set()
            return
        while True:
            now = self._clock()
            self.warn_if_expiring(now)
            wait = self.next_step(now)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                async with asyncio.timeout(CHECK_EVERY_S):
                    session = await self._sessions()
            except TimeoutError:
                continue  # not connected for an hour: look at the clock (and warn) again
            try:
                staged = await self.renew_once(session)
            except RenewalError as exc:
                self._retry_at = failed_attempt(self._state_dir, retry=self._retry, now=now)
                log.error(
                    "certificate renewal failed: %s; next attempt in %.0f s",
                    exc,
                    self._retry_at - now,
                )
                continue
            log.info(
                "renewed certificate staged: serial %x, valid until %s; reconnecting with it",
                staged.certificate.serial_number,
                f"{staged.not_after:%Y-%m-%d %H:%M} UTC",
            )
            self.staged.set()
            return

    def _staged_paths(self) -> tuple[Path, Path]:
        return staged_paths(self.identity.key_path, self.identity.cert_path)

    def staged_identity(self) -> Identity | None:
        """The staged key and certificate, if they are complete and usable for this gateway."""
        key_new, cert_new = self._staged_paths()
        try:
            staged = load_identity(key_new, cert_new, self.identity.ca_path)
        except IdentityError:
            return None
        return staged if staged.gateway_id == self.identity.gateway_id else None

    def _staged_key(self) -> PrivateKey:
        """The staged key of an earlier attempt, or a new one (same kind) written as `.new`."""
        key_new, _ = self._staged_paths()
        current = self.identity.key
        earlier = _read_private_key(key_new)
        if (
            earlier is not None
            and isinstance(earlier, Ed25519PrivateKey) == isinstance(current, Ed25519PrivateKey)
            and spki_der(earlier.public_key()) != spki_der(current.public_key())
        ):
            return earlier
        key = _new_key_like(current)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_atomically(key_new, pem, 0o600)
        except OSError as exc:
            raise RenewalError(
                f"cannot write {key_new} ({exc.strerror}): the service must be able to write "
                f"{key_new.parent} (systemd: ReadWritePaths={key_new.parent})"
            ) from None
        return key

    async def renew_once(self, session: Session | None = None) -> Identity:
        """One attempt: stage a new key and certificate; RenewalError if anything fails."""
        identity = self.identity
        key = self._staged_key()
        self._checkpoint("key-staged")
        csr = _csr(key, identity.certificate.subject)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        request_id = new_request_id()
        request = EnrollRequest(
            gateway_id=identity.gateway_id,
            request_id=request_id,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            certificate_pem=identity.certificate.public_bytes(serialization.Encoding.PEM).decode(
                "ascii"
            ),
            proof=sign_proof(identity.key, proof_message(identity.gateway_id, request_id, csr_der)),
        )
        if session is None:
            session = await self._sessions()
        try:
            reply = await exchange(
                session,
                self._prefix,
                request,
                self._reply_timeout_s,
                on_sent=lambda: self._checkpoint("requested"),
            )
        except TimeoutError:
            raise RenewalError(
                f"no answer from the registrar within {self._reply_timeout_s:g} s"
            ) from None
        except (SessionLost, PublishRefused) as exc:
            raise RenewalError(str(exc)) from None
        if reply.certificate_pem is None:
            raise RenewalError(f"the registrar refused: {reply.message or reply.error}")
        return self._stage_certificate(reply.certificate_pem)

    def _stage_certificate(self, certificate_pem: str) -> Identity:
        key_new, cert_new = self._staged_paths()
        try:
            write_atomically(cert_new, certificate_pem.encode("ascii", "replace"), 0o644)
        except OSError as exc:
            raise RenewalError(f"cannot write {cert_new} ({exc.strerror})") from None
        self._checkpoint("cert-staged")
        try:
            staged = load_identity(key_new, cert_new, self.identity.ca_path)
        except IdentityError as exc:
            _discard(cert_new)
            raise RenewalError(f"the registrar's certificate is not usable: {exc}") from None
        if staged.gateway_id != self.identity.gateway_id:
            _discard(cert_new)
            raise RenewalError(f"the registrar's certificate is for {staged.gateway_id!r}")
        return staged


# -- the switch ---------------------------------------------------------------------------------


def _seed_sequence(state_dir: Path, old_kid: bytes, new_kid: bytes) -> None:
    """Start the new key's sequence numbers where the old key's stopped (never lower).

    The file name is the spool's (agent.service: `seq-<kid>`); the spool also
    starts above its own last number, so this matters when the spool is lost.
    """
    new_path = state_dir / f"seq-{new_kid.hex()}"
    try:
        bound = SeqCounter(state_dir / f"seq-{old_kid.hex()}").peek()
        if SeqCounter(new_path).peek() >= bound:
            return
    except SeqError as exc:
        log.warning("the new key's sequence numbers start from the spool's: %s", exc)
        return
    write_atomically(new_path, f"{bound}\n".encode("ascii"), 0o600)


def _swap(key: Path, cert: Path, checkpoint: Checkpoint) -> None:
    key_new, cert_new = staged_paths(key, cert)
    _keep_old(key)
    _keep_old(cert)
    checkpoint("old-kept")
    os.replace(key_new, key)  # from here to the next rename, recover_identity finishes the swap
    fsync_directory(key.parent)
    checkpoint("key-swapped")
    os.replace(cert_new, cert)
    fsync_directory(cert.parent)
    checkpoint("cert-swapped")


async def adopt_staged(config: Config, *, checkpoint: Checkpoint = _no_checkpoint) -> Identity:
    """Switch to the staged key and certificate if the broker accepts them.

    Call it while the service is stopped. Returns the identity installed
    afterwards: the renewed one, or the current one (the staged files are then
    removed, and the next renewal waits for the retry delay).
    """
    paths, broker, state_dir = config.identity, config.broker, config.gateway.state_dir
    key_new, cert_new = staged_paths(paths.key, paths.cert)
    current = load_identity(paths.key, paths.cert, paths.ca)
    try:
        staged = load_identity(key_new, cert_new, paths.ca)
        if staged.gateway_id != current.gateway_id:
            raise IdentityError(f"it names {staged.gateway_id!r}, not {current.gateway_id!r}")
    except IdentityError as exc:
        log.error("not switching to the staged certificate: %s", exc)
        _discard(key_new, cert_new)
        failed_attempt(state_dir)
        return current
    settings = SessionSettings(
        host=broker.host,
        port=broker.port,
        client_id=staged.gateway_id,
        tls=client_context(staged),
        keepalive_s=broker.keepalive_s,
        connect_timeout_s=broker.connect_timeout_s,
    )
    try:
        trial = await Session.open(settings)
        await trial.close()
    except ConnectFailed as exc:
        retry_at = failed_attempt(state_dir)
        log.error(
            "the broker did not accept the renewed certificate (%s): keeping the current one; "
            "next renewal in %.0f s",
            exc,
            retry_at - time.time(),
        )
        _discard(key_new, cert_new)
        return current
    checkpoint("trial-connected")
    try:
        _seed_sequence(state_dir, current.kid, staged.kid)
        _swap(paths.key, paths.cert, checkpoint)
    except OSError as exc:
        log.error("could not switch to the renewed certificate: %s", exc)
        recover_identity(paths.key, paths.cert)
        _discard(key_new, cert_new)
        failed_attempt(state_dir)
        return load_identity(paths.key, paths.cert, paths.ca)
    _clear_hold(state_dir)
    renewed = load_identity(paths.key, paths.cert, paths.ca)
    log.info(
        "switched to the renewed certificate (serial %x, valid until %s); the previous key and "
        "certificate are kept as %s and %s",
        renewed.certificate.serial_number,
        f"{renewed.not_after:%Y-%m-%d %H:%M} UTC",
        paths.key.name + OLD,
        paths.cert.name + OLD,
    )
    return renewed
