"""The verifying subscriber: trust only what the gateways' keys signed.

`TrustStore.from_certificates` accepts a gateway certificate only if the CA
issued it; its key id (DESIGN.md §3) then maps to the gateway id (the CN).
`Verifier.check` verifies one message against the topic it arrived on and
keeps the counts a consumer needs: messages, verified, failed, duplicates by
(gateway, seq), readings. `citygate verify` subscribes with its own client
certificate and prints every verified reading as a JSON line on stdout and
every failure as a JSON line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from agent.envelope import TrustedKey, VerificationError, VerifiedMessage, open_sealed
from agent.identity import IdentityError, gateway_id_of, issued_by, public_key_of
from agent.keys import kid_for
from agent.mqtt import ConnectFailed, Session, SessionLost, SessionSettings
from agent.tls import verifier_context

log = logging.getLogger(__name__)


class TrustError(Exception):
    """A gateway certificate cannot be trusted."""


def trust_store(ca_path: Path, cert_paths: Iterable[Path]) -> dict[bytes, TrustedKey]:
    cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
    trusted: dict[bytes, TrustedKey] = {}
    for path in cert_paths:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if not any(issued_by(cert, ca) for ca in cas):
            raise TrustError(f"{path}: not issued by a CA in {ca_path}")
        try:
            key = public_key_of(cert)
            gateway_id = gateway_id_of(cert)
        except IdentityError as exc:
            raise TrustError(f"{path}: {exc}") from exc
        trusted[kid_for(key)] = TrustedKey(gateway_id, key)
    return trusted


@dataclass
class Verifier:
    trusted: Mapping[bytes, TrustedKey]
    prefix: str = "citygate"
    messages: int = 0
    verified: int = 0
    failed: int = 0
    duplicates: int = 0
    readings: int = 0
    seen: set[tuple[str, int]] = field(default_factory=set)

    def check(self, topic: str, payload: bytes) -> VerifiedMessage:
        """Verify one message; raises VerificationError (and counts it) if it fails."""
        self.messages += 1
        try:
            message = open_sealed(payload, topic, self.trusted, prefix=self.prefix)
        except VerificationError:
            self.failed += 1
            raise
        self.verified += 1
        key = (message.gateway_id, message.seq)
        if key in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(key)
            self.readings += len(message.records)
        return message

    def summary(self) -> dict[str, int]:
        return {
            "messages": self.messages,
            "verified": self.verified,
            "failed_verification": self.failed,
            "duplicates": self.duplicates,
            "readings": self.readings,
        }


def reading_lines(message: VerifiedMessage) -> list[str]:
    """One JSON object per record; "tq": "before" is added when `t` is only an upper bound
    (taken in a boot whose clock was never set)."""
    return [
        json.dumps(
            {
                "gateway": message.gateway_id,
                "seq": message.seq,
                "sensor": r.sensor,
                "n": r.n,
                "u": r.u,
                "v": r.v,
                "t": r.t,
                **({"tq": r.time_quality} if r.time_quality else {}),
            }
        )
        for r in message.records
    ]


async def subscribe_and_verify(
    settings: SessionSettings,
    verifier: Verifier,
    *,
    on_verified: Callable[[VerifiedMessage, bytes], None],
    on_failed: Callable[[str, VerificationError], None],
    stop: asyncio.Event,
    subscribed: asyncio.Event | None = None,
    topic_filter: str | None = None,
) -> None:
    """Stay subscribed (reconnecting) and verify every telemetry message until `stop`.

    `on_verified` gets the verified contents and the raw bytes. `subscribed` is
    set once the broker has granted the first subscription.
    """
    topic_filter = topic_filter or f"{verifier.prefix}/+/telemetry"
    while not stop.is_set():
        try:
            session = await Session.open(settings)
        except ConnectFailed as exc:
            log.warning("verifier: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
            continue
        async with session:
            closer = asyncio.create_task(_close_when(stop, session), name="verifier-stop")
            try:
                await session.subscribe(topic_filter, qos=1)
                if subscribed is not None:
                    subscribed.set()
                async for msg in session.messages():
                    try:
                        on_verified(verifier.check(msg.topic, msg.payload), msg.payload)
                    except VerificationError as exc:
                        on_failed(msg.topic, exc)
            except SessionLost as exc:
                log.warning("verifier: %s", exc)
            finally:
                closer.cancel()


async def _close_when(stop: asyncio.Event, session: Session) -> None:
    await stop.wait()
    await session.close()


def _common_name(cert_path: Path) -> str:
    """Our client id: the broker derives it from the certificate's CN anyway."""
    try:
        return gateway_id_of(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    except (OSError, ValueError, IdentityError):
        return ""


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="localhost", help="broker host name (TLS-verified)")
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--ca", required=True, type=Path, help="CA bundle")
    parser.add_argument("--cert", required=True, type=Path, help="our client certificate")
    parser.add_argument("--key", required=True, type=Path, help="our client key")
    parser.add_argument(
        "--gateway-cert",
        action="append",
        type=Path,
        required=True,
        help="a trusted gateway's certificate (repeat for each gateway)",
    )
    parser.add_argument("--prefix", default="citygate")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--count", type=int, help="stop after this many verified messages")


def run_verify_command(args: argparse.Namespace) -> int:
    trusted = trust_store(args.ca, args.gateway_cert)
    verifier = Verifier(trusted, prefix=args.prefix)
    settings = SessionSettings(
        host=args.host,
        port=args.port,
        client_id=_common_name(args.cert),
        tls=verifier_context(args.cert, args.key, args.ca),
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.duration:
            loop.call_later(args.duration, stop.set)

        def verified(message: VerifiedMessage, _payload: bytes) -> None:
            for line in reading_lines(message):
                print(line, flush=True)
            if args.count and verifier.verified >= args.count:
                stop.set()

        def failed(topic: str, exc: VerificationError) -> None:
            print(json.dumps({"ok": False, "topic": topic, "error": str(exc)}), file=sys.stderr)

        await subscribe_and_verify(
            settings, verifier, on_verified=verified, on_failed=failed, stop=stop
        )

    try:
        asyncio.run(main())
    finally:
        print(json.dumps(verifier.summary()), file=sys.stderr)
    return 1 if verifier.failed else 0
