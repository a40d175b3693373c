"""The registrar: issues gateway certificates on request, over MQTT, with the lab CA.

`citygate provision registrar` subscribes (with its own client certificate)
to `<prefix>/+/enroll/request` and answers each request on the gateway's
`<prefix>/<gw>/enroll/reply` (wire format: `agent.rotation`, decision record:
docs/adr/0005). It never sees a private key: a request carries a CSR.

`Registrar.decide` is the policy. Every request must come on the topic of the
gateway it names (the broker's ACL lets only that gateway, or its claim
certificate, write there), name a gateway of the allow-list, and carry a CSR
that is validly signed, for an Ed25519 or P-256 key, with the gateway id as
its common name. Then either

- enrollment: a one-time token bound to this gateway, unexpired and unused
  (`provisioning.tokens`); or
- renewal: the gateway's current certificate, issued by this CA, valid now, not
  on the revocation list, and a proof signed by its key (so neither a claim
  certificate nor an eavesdropper can renew), for a new key.

The revocation list is a CRL signed by the CA (`<ca dir>/crl.pem`), which the
broker also reads (mosquitto `crlfile`): `citygate provision revoke` adds a
certificate to it; the registrar writes it at start when there is none and
signs it afresh every day, so it never goes stale while the registrar runs.

Trust: request payloads are untrusted until every check above has passed; the
CA directory, the token file and the allow-list are the operator's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import random
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from agent.backoff import Backoff
from agent.identity import (
    IdentityError,
    gateway_id_of,
    is_valid_gateway_id,
    issued_by,
    public_key_of,
)
from agent.keys import PublicKey, spki_der
from agent.logging_setup import configure_logging
from agent.mqtt import (
    ConnectFailed,
    Message,
    PublishRefused,
    Session,
    SessionLost,
    SessionSettings,
)
from agent.rotation import (
    EnrollReply,
    EnrollRequest,
    ProtocolError,
    proof_is_valid,
    proof_message,
    reply_topic,
)
from agent.tls import verifier_context
from provisioning.identity_tools import ProvisionError, usable_serial
from provisioning.labca import LabCa, LabCaError, certificate_pem, load_ca, sign_csr
from provisioning.pki import PkiError
from provisioning.tokens import (
    CRL_NAME,
    RevocationError,
    TokenError,
    TokenRefused,
    TokenStore,
    add_commands,
    read_crl,
    write_crl,
)

log = logging.getLogger(__name__)

CRL_REFRESH_S = 86400.0
DEFAULT_DAYS = 90
RECONNECT = Backoff(0.5, 30.0)


class RegistrarError(Exception):
    """The registrar cannot start or act; the message says what to do."""


class Refused(Exception):
    """A request is refused; `code` for machines, the message for the technician."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- the allow-list ------------------------------------------------------------------------


class AllowList:
    """Gateway ids allowed to enroll and renew: one per line, `#` comments; re-read on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._ids = self._load()

    def _load(self) -> frozenset[str]:
        try:
            stat = self.path.stat()
            lines = self.path.read_text().splitlines()
        except OSError as exc:
            raise RegistrarError(f"cannot read the allow-list {self.path} ({exc})") from None
        ids = set()
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if text and not is_valid_gateway_id(text):
                raise RegistrarError(f"{self.path}:{number}: {text!r} is not a gateway id")
            if text:
                ids.add(text)
        self._mtime = stat.st_mtime
        return frozenset(ids)

    def __contains__(self, gateway_id: object) -> bool:
        with contextlib.suppress(OSError):
            if self.path.stat().st_mtime != self._mtime:
                try:
                    self._ids = self._load()
                except RegistrarError as exc:
                    log.error("%s; keeping the previous allow-list", exc)
        return gateway_id in self._ids


# -- the policy ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issued:
    gateway_id: str
    kind: str  # what it was, for the log
    cert: x509.Certificate


def _csr(
    request: EnrollRequest, gateway_id: str
) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    try:
        csr = x509.load_pem_x509_csr(request.csr_pem.encode("ascii", "replace"))
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        raise Refused("bad-csr", "the CSR is not a valid, signed PEM request") from None
    if not valid:
        raise Refused("bad-csr", "the CSR's signature is not valid")
    try:
        key = csr.public_key()
    except UnsupportedAlgorithm:
        key = None
    if not isinstance(key, Ed25519PublicKey) and not (
        isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    ):
        raise Refused("bad-csr", "the CSR must be for an Ed25519 or ECDSA P-256 key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [gateway_id]:
        raise Refused("bad-csr", f"the CSR must have the common name {gateway_id!r}")
    serials = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    if len(serials) > 1 or not all(isinstance(v, str) and usable_serial(v) for v in serials):
        raise Refused("bad-csr", "the CSR's serialNumber is not usable in a certificate")
    return csr, key


class Registrar:
    """Decides requests and issues certificates; `decide` is called once per request."""

    def __init__(
        self,
        ca: LabCa,
        tokens: TokenStore,
        allow: AllowList,
        *,
        prefix: str = "citygate",
        days: int = DEFAULT_DAYS,
        crl_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self.tokens = tokens
        self.allow = allow
        self.prefix = prefix
        self.days = days
        self.crl_path = crl_path or ca.directory / CRL_NAME
        self._clock = clock

    def gateway_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 4 and parts[0] == self.prefix and parts[2:] == ["enroll", "request"]:
            return parts[1] if is_valid_gateway_id(parts[1]) else None
        return None

    def handle(self, topic: str, payload: bytes) -> tuple[str, EnrollReply] | None:
        """The reply (topic, message) to one request; None for what cannot be answered."""
        gateway_id = self.gateway_of(topic)
        if gateway_id is None:
            log.warning("ignoring a message on %s", topic)
            return None
        try:
            request = EnrollRequest.decode(payload)
        except ProtocolError as exc:
            log.warning("ignoring a malformed request from %s: %s", gateway_id, exc)
            return None
        where = reply_topic(self.prefix, gateway_id)
        try:
            issued = self.decide(gateway_id, request)
        except (RevocationError, TokenError, OSError) as exc:
            log.error("cannot answer %s (request %s): %s", gateway_id, request.request_id, exc)
            message = "the registrar cannot answer now: try again later"
            return where, EnrollReply(request.request_id, error="unavailable", message=message)
        except Refused as exc:
            log.warning(
                "refused %s of %s (request %s): %s",
                "enrollment" if request.token is not None else "renewal",
                gateway_id,
                request.request_id,
                exc,
            )
            return where, EnrollReply(request.request_id, error=exc.code, message=str(exc))
        end = issued.cert.not_valid_after_utc
        log.info(
            "%s of %s: issued certificate serial %x, valid until %s UTC",
            issued.kind,
            gateway_id,
            issued.cert.serial_number,
            f"{end:%Y-%m-%d %H:%M}",
        )
        pem = certificate_pem(issued.cert).decode("ascii")
        return where, EnrollReply(request.request_id, certificate_pem=pem)

    def decide(self, gateway_id: str, request: EnrollRequest) -> Issued:
        """Check a request from the topic of `gateway_id`; Refused, or the new certificate."""
        if request.gateway_id != gateway_id:
            raise Refused("bad-request", "the request names another gateway than its topic")
        if gateway_id not in self.allow:
            raise Refused(
                "not-allowed", f"gateway {gateway_id} is not on the registrar's allow-list"
            )
        csr, key = _csr(request, gateway_id)
        if request.token is not None:
            key_sha256 = hashlib.sha256(spki_der(key)).hexdigest()
            return self._enroll(gateway_id, request, request.token, csr, key_sha256)
        self._check_renewal(gateway_id, request, csr, key)
        return Issued(gateway_id, "renewal", self._sign(csr, gateway_id))

    def _sign(self, csr: x509.CertificateSigningRequest, gateway_id: str) -> x509.Certificate:
        try:
            return sign_csr(self.ca, csr, Path(f"request-of-{gateway_id}"), days=self.days)
        except LabCaError as exc:
            raise Refused("bad-csr", str(exc)) from None

    def _enroll(
        self,
        gateway_id: str,
        request: EnrollRequest,
        token: str,
        csr: x509.CertificateSigningRequest,
        key_sha256: str,
    ) -> Issued:
        try:
            record = self.tokens.redeem(
                token,
                gateway_id=gateway_id,
                request_id=request.request_id,
                key_sha256=key_sha256,
                now=self._clock(),
            )
        except TokenRefused as exc:
            raise Refused(exc.code, str(exc)) from None
        if record.serial is not None:  # the same key again: the reply was lost on the way
            with contextlib.suppress(OSError, ValueError):
                issued = self.ca.directory / "issued" / f"{record.serial}.crt"
                cert = x509.load_pem_x509_certificate(issued.read_bytes())
                return Issued(gateway_id, "repeated enrollment", cert)
        cert = self._sign(csr, gateway_id)
        self.tokens.record_serial(record.digest, f"{cert.serial_number:x}")
        return Issued(gateway_id, f"enrollment (token {record.token_id})", cert)

    def _check_renewal(
        self,
        gateway_id: str,
        request: EnrollRequest,
        csr: x509.CertificateSigningRequest,
        key: PublicKey,
    ) -> None:
        if request.certificate_pem is None or request.proof is None:
            raise Refused("bad-request", "a renewal carries the current certificate and a proof")
        try:
            current = x509.load_pem_x509_certificate(request.certificate_pem.encode("ascii"))
            named = gateway_id_of(current)
            current_key = public_key_of(current)
        except (ValueError, UnicodeEncodeError, IdentityError):
            raise Refused("bad-certificate", "the current certificate is not readable") from None
        if named != gateway_id or not issued_by(current, self.ca.cert):
            raise Refused(
                "bad-certificate",
                f"the current certificate is not one this CA issued to {gateway_id}",
            )
        now = datetime.fromtimestamp(self._clock(), UTC)
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise Refused(
                "expired", "the current certificate is not valid now: enroll again with a token"
            )
        crl = read_crl(self.ca, self.crl_path)
        if crl is not None and crl.get_revoked_certificate_by_serial_number(current.serial_number):
            raise Refused(
                "revoked", f"the certificate of {gateway_id} is revoked: it is not renewed"
            )
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        message = proof_message(gateway_id, request.request_id, csr_der)
        if not proof_is_valid(current_key, message, request.proof):
            raise Refused("bad-proof", "the renewal is not signed by the current certificate's key")
        if spki_der(current_key) == spki_der(key):
            raise Refused("same-key", "a renewal must be for a new key")


# -- the service -----------------------------------------------------------------------------------


async def _until(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def serve(
    registrar: Registrar,
    settings: SessionSettings,
    stop: asyncio.Event,
    *,
    backoff: Backoff = RECONNECT,
    ready: asyncio.Event | None = None,
) -> None:
    """Answer requests until `stop`; reconnect with backoff; sign the CRL afresh daily.

    `ready` is set once the first subscription is in place.
    """
    attempt = 0
    subscription = f"{registrar.prefix}/+/enroll/request"
    while not stop.is_set():
        try:
            session = await Session.open(settings)
        except ConnectFailed as exc:
            delay = backoff.delay(attempt, random.Random())
            attempt += 1
            log.warning("broker: %s; retrying in %.1f s", exc, delay)
            await _until(stop, delay)
            continue
        attempt = 0
        try:
            await session.subscribe(subscription)
            log.info("registrar ready: answering %s", subscription)
            if ready is not None:
                ready.set()
            await _answer(registrar, session, stop)
        except (SessionLost, PublishRefused) as exc:
            log.warning("connection to the broker lost: %s", exc)
        finally:
            await session.close()


async def _answer(registrar: Registrar, session: Session, stop: asyncio.Event) -> None:
    """One request at a time until `stop` or the session ends."""
    stream = session.messages()
    stopping = asyncio.ensure_future(stop.wait())
    incoming: asyncio.Future[Message] | None = None
    refreshed = time.monotonic()
    try:
        while True:
            if incoming is None:  # one pending read at a time: a cancelled one would eat a message
                incoming = asyncio.ensure_future(anext(stream))
            waiters: set[asyncio.Future[Any]] = {incoming, stopping}
            done, _ = await asyncio.wait(
                waiters, timeout=CRL_REFRESH_S, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done:
                return
            if time.monotonic() - refreshed >= CRL_REFRESH_S:
                write_crl(registrar.ca, registrar.crl_path)
                refreshed = time.monotonic()
            if incoming not in done:
                continue
            try:
                message = incoming.result()
            except StopAsyncIteration:
                raise SessionLost(str(session.lost.result())) from None
            incoming = None
            answer = registrar.handle(message.topic, message.payload)
            if answer is not None:
                await session.publish(answer[0], answer[1].encode())
    finally:
        stopping.cancel()
        if incoming is not None:
            incoming.cancel()


# -- the command ---------------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]


def translated(handler: Handler) -> Handler:
    """Print an error of the online-enrollment side as `citygate: reason` and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (
            RegistrarError,
            TokenError,
            RevocationError,
            LabCaError,
            ProvisionError,
            PkiError,
        ) as exc:
            print(f"citygate: {exc}", file=sys.stderr)
            return 1

    return run


def register_registrar(actions: Any) -> None:
    """Add `registrar`, `token` and `revoke` to `citygate provision` (its subparsers)."""
    parser: argparse.ArgumentParser = actions.add_parser(
        "registrar",
        help="issue gateway certificates online: enrollment with a token, and renewal",
        description="Answer enrollment and renewal requests that gateways publish on "
        "<prefix>/<gw>/enroll/request, with certificates signed by the CA in DIR; runs until "
        "SIGTERM. See docs/adr/0005-enrollment-and-rotation.md.",
    )
    parser.add_argument(
        "--ca", type=Path, required=True, metavar="DIR", help="the CA directory (ca.key, ca.crt)"
    )
    parser.add_argument(
        "--broker-host", required=True, metavar="HOST", help="as in the broker's certificate"
    )
    parser.add_argument(
        "--broker-port", type=int, default=8883, metavar="PORT", help="main listener (8883)"
    )
    parser.add_argument(
        "--cert", type=Path, required=True, metavar="FILE", help="the registrar's certificate"
    )
    parser.add_argument("--key", type=Path, required=True, metavar="FILE", help="and its key")
    parser.add_argument(
        "--ca-bundle", type=Path, required=True, metavar="FILE", help="CA(s) of the broker"
    )
    parser.add_argument("--tokens", type=Path, required=True, metavar="FILE", help="the token file")
    parser.add_argument(
        "--allow", type=Path, required=True, metavar="FILE", help="gateway ids, one per line"
    )
    parser.add_argument("--prefix", default="citygate", help="topic prefix (default citygate)")
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    parser.add_argument("--crl", type=Path, metavar="FILE", help=f"default: DIR/{CRL_NAME}")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(handler=translated(_cmd_registrar))
    add_commands(actions, translated)


def _cmd_registrar(args: argparse.Namespace) -> int:
    configure_logging(args.log_level or "info")
    ca = load_ca(Path(args.ca))
    if args.days < 1:
        raise RegistrarError(f"--days {args.days}: a certificate must be valid at least a day")
    registrar = Registrar(
        ca,
        TokenStore(Path(args.tokens)),
        AllowList(Path(args.allow)),
        prefix=args.prefix,
        days=args.days,
        crl_path=Path(args.crl) if args.crl else None,
    )
    write_crl(ca, registrar.crl_path)  # the broker's crlfile must exist and be current
    try:
        cert = x509.load_pem_x509_certificate(Path(args.cert).read_bytes())
        client_id = gateway_id_of(cert)
        tls = verifier_context(Path(args.cert), Path(args.key), Path(args.ca_bundle))
    except (OSError, ValueError, IdentityError, ssl.SSLError) as exc:
        raise RegistrarError(f"the registrar's own credentials are not usable: {exc}") from None
    settings = SessionSettings(
        host=args.broker_host,
        port=args.broker_port,
        client_id=client_id,
        tls=tls,
        connect_timeout_s=10.0,
        clean_start=False,  # requests sent while it reconnects wait for it
        session_expiry_s=86400,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(registrar, settings, stop)

    asyncio.run(main())
    log.info("registrar stopped")
    return 0
