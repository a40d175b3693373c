"""`citygate provision enroll`: online enrollment with a claim certificate and a one-time token.

On the gateway, once: the key is made here (or the one `keygen` made is
used), its CSR goes with the token to the registrar over the broker's
enrollment listener, authenticated with the gateway's claim certificate
(CN = gateway id, from a claim CA that only that listener trusts, whose ACL
allows nothing but `<prefix>/<gw>/enroll/request` and reading the reply). The
certificate that comes back is installed by `install_certificate`, after the
same checks the agent makes at start-up, and the command then logs in to the
broker's main listener with it to show that it works (docs/adr/0005).

Running it again is safe: a gateway that already holds a valid certificate
is left alone, and after a lost reply the same key asks again and gets the
same certificate.

Trust: the reply is untrusted until `install_certificate` accepts it for this
gateway's key and CA bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import Config, load_config
from agent.identity import Identity, IdentityError, gateway_id_of, load_identity
from agent.mqtt import ConnectFailed, PublishRefused, Session, SessionLost, SessionSettings
from agent.rotation import EnrollReply, EnrollRequest, exchange, new_request_id
from agent.tls import client_context, verifier_context
from provisioning.identity_tools import (
    DEFAULT_CONFIG,
    ProvisionError,
    build_csr,
    csr_pem,
    generate_device_key,
    hardware_serial,
    install_certificate,
    load_device_key,
    resolve_owner,
)
from provisioning.labca import LabCaError
from provisioning.pki import PkiError

#: the broker's enrollment listener (mosquitto `listener` with the claim CA and its own ACL)
ENROLL_PORT = 8884
CLAIM_CERT = "claim.crt"
CLAIM_KEY = "claim.key"
REPLY_TIMEOUT_S = 30.0


Handler = Callable[[argparse.Namespace], int]


def _translated(handler: Handler) -> Handler:
    """A provisioning error becomes the one line `citygate: reason` and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ProvisionError, LabCaError, PkiError) as exc:
            print(f"citygate: {exc}", file=sys.stderr)
            return 1

    return run


def register_enroll(actions: Any) -> None:
    """Add `enroll` to `citygate provision` (its subparsers)."""
    enroll: argparse.ArgumentParser = actions.add_parser(
        "enroll",
        help="get this gateway's certificate online with a one-time token",
        description="Make the gateway key here (or use the one keygen made), send its CSR with "
        "the one-time token to the registrar through the broker's enrollment listener, "
        "authenticated by the gateway's claim certificate, and install the certificate that "
        "comes back. See docs/technician.md.",
    )
    enroll.add_argument("--token", required=True, help="the enrollment token from operations")
    enroll.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}"
    )
    enroll.add_argument(
        "--claim-cert", type=Path, help=f"default: {CLAIM_CERT} next to identity.key"
    )
    enroll.add_argument("--claim-key", type=Path, help=f"default: {CLAIM_KEY} next to identity.key")
    enroll.add_argument(
        "--port",
        type=int,
        default=ENROLL_PORT,
        help=f"the broker's enrollment port (default {ENROLL_PORT})",
    )
    enroll.add_argument(
        "--ca", type=Path, metavar="FILE", help="CA bundle to install when the gateway has none"
    )
    enroll.add_argument("--ec", action="store_true", help="a new key is ECDSA P-256, not Ed25519")
    enroll.add_argument(
        "--timeout",
        type=float,
        default=REPLY_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the registrar (default {REPLY_TIMEOUT_S:g})",
    )
    enroll.set_defaults(handler=_translated(_cmd_enroll))


def _claim(args: argparse.Namespace, config: Config) -> tuple[Path, Path, str]:
    """The claim certificate and key files, and the gateway id the certificate names."""
    directory = config.identity.key.parent
    cert = Path(args.claim_cert) if args.claim_cert else directory / CLAIM_CERT
    key = Path(args.claim_key) if args.claim_key else directory / CLAIM_KEY
    try:
        gateway_id = gateway_id_of(x509.load_pem_x509_certificate(cert.read_bytes()))
    except FileNotFoundError:
        raise ProvisionError(
            f"there is no claim certificate at {cert}: copy the gateway's claim.crt and "
            "claim.key there (from operations), or pass --claim-cert and --claim-key"
        ) from None
    except (OSError, ValueError, IdentityError) as exc:
        raise ProvisionError(f"the claim certificate {cert} is not usable: {exc}") from None
    load_device_key(key)  # refuses a claim key others may read
    return cert, key, gateway_id


def _enrolled(config: Config, gateway_id: str) -> Identity | None:
    paths = config.identity
    with contextlib.suppress(IdentityError):
        identity = load_identity(paths.key, paths.cert, paths.ca)
        if identity.gateway_id == gateway_id:
            return identity
    return None


def _cmd_enroll(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    paths = config.identity
    claim_cert, claim_key, gateway_id = _claim(args, config)
    done = _enrolled(config, gateway_id)
    if done is not None:
        print(
            f"gateway {gateway_id} is already enrolled (certificate valid until "
            f"{done.not_after:%Y-%m-%d}): nothing to do; the token was not used"
        )
        return 0
    if paths.key.exists():
        key = load_device_key(paths.key)
        print(f"using the gateway key {paths.key}")
    else:
        made = generate_device_key(
            paths.key, kind="p256" if args.ec else "ed25519", owner=resolve_owner(None)
        )
        key = load_device_key(made.path)
        print(f"made the gateway key {made.path} ({made.kind}, mode 0600)")
    anchor = Path(args.ca) if args.ca else paths.ca
    if not anchor.exists():
        raise ProvisionError(f"no CA bundle at {anchor}: pass the fleet's CA with --ca FILE")
    request = EnrollRequest(
        gateway_id=gateway_id,
        request_id=new_request_id(),
        csr_pem=csr_pem(build_csr(key, gateway_id, hardware_serial())).decode("ascii"),
        token=args.token,
    )
    try:
        tls = verifier_context(claim_cert, claim_key, anchor)
    except OSError as exc:
        raise ProvisionError(f"cannot use the claim certificate: {exc}") from None
    settings = SessionSettings(
        host=config.broker.host,
        port=args.port,
        client_id=gateway_id,
        tls=tls,
        connect_timeout_s=config.broker.connect_timeout_s,
    )
    reply = asyncio.run(_ask(settings, config.broker.prefix, request, args.timeout))
    if not reply.ok or reply.certificate_pem is None:
        raise ProvisionError(
            f"the registrar refused the enrollment: {reply.message or reply.error}"
        )
    identity = _install(reply.certificate_pem, config, Path(args.ca) if args.ca else None)
    print(
        f"installed {paths.cert}: gateway {identity.gateway_id}, valid until "
        f"{identity.not_after:%Y-%m-%d} ({(identity.not_after - datetime.now(UTC)).days} days)"
    )
    asyncio.run(_log_in(config, identity))
    print(f"the broker {config.broker.host}:{config.broker.port} accepts the new certificate")
    print("next: sudo systemctl restart citygate, then citygate doctor")
    return 0


async def _ask(
    settings: SessionSettings, prefix: str, request: EnrollRequest, timeout_s: float
) -> EnrollReply:
    where = f"{settings.host}:{settings.port}"
    try:
        session = await Session.open(settings)
    except ConnectFailed as exc:
        raise ProvisionError(
            f"the broker's enrollment listener {where} did not let the claim certificate in "
            f"({exc}): check the network, the port, and that the claim certificate is current"
        ) from None
    try:
        return await exchange(session, prefix, request, timeout_s)
    except TimeoutError:
        raise ProvisionError(
            f"no answer from the registrar within {timeout_s:g} s: ask operations whether it "
            "runs; then run this command again (the token stays valid until it is used)"
        ) from None
    except PublishRefused:
        raise ProvisionError(
            f"the broker does not let this claim certificate enroll {request.gateway_id} "
            "(reason 135): ask operations for the claim certificate of this gateway"
        ) from None
    except SessionLost as exc:
        raise ProvisionError(f"the connection to {where} dropped: {exc}; run it again") from None
    finally:
        await session.close()


def _install(certificate_pem: str, config: Config, ca_file: Path | None) -> Identity:
    """Install the certificate the registrar returned, after install_certificate's checks."""
    paths = config.identity
    paths.cert.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    received = paths.cert.parent / f".enrolled.{secrets.token_hex(8)}.crt"
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode("ascii", "replace"))
        received.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return install_certificate(received, paths, ca_file=ca_file).identity
    except ValueError:
        raise ProvisionError("the registrar sent something that is not a certificate") from None
    except IdentityError as exc:
        raise ProvisionError(f"the registrar's certificate was not installed: {exc}") from None
    finally:
        received.unlink(missing_ok=True)


async def _log_in(config: Config, identity: Identity) -> None:
    broker = config.broker
    settings = SessionSettings(
        host=broker.host,
        port=broker.port,
        client_id=identity.gateway_id,
        tls=client_context(identity),
        connect_timeout_s=broker.connect_timeout_s,
    )
    try:
        session = await Session.open(settings)
    except ConnectFailed as exc:
        raise ProvisionError(
            f"the certificate is installed, but the broker did not accept it yet ({exc}): "
            "run citygate doctor"
        ) from None
    await session.close()
