"""`citygate provision ...`: the gateway's key, CSR and certificate, and a lab CA.

Registered through the `citygate.commands` entry point (docs/adr/0003). The
commands that run on the gateway read the [identity] paths from its config
(`--config`, default /etc/citygate/gateway.toml). Errors of the provisioning
modules are translated here, once, into one line on stderr and exit status 1.

Nothing here prints or copies a private key: keygen reports the key's path,
type and key id only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.identity import gateway_id_of
from provisioning.enroll import register_enroll
from provisioning.identity_tools import (
    DEFAULT_CONFIG,
    DEFAULT_KEY_NAME,
    SERVICE_USER,
    ProvisionError,
    build_csr,
    csr_pem,
    generate_device_key,
    hardware_serial,
    identity_paths,
    install_certificate,
    load_device_key,
    resolve_owner,
    subject_text,
)
from provisioning.labca import LabCaError, certificate_pem, init_ca, load_ca, read_csr, sign_csr
from provisioning.pki import PkiError, write_file_atomically
from provisioning.registrar import register_registrar
from provisioning.seed import register_seed

Handler = Callable[[argparse.Namespace], int]

LAB = "LAB TOOL, for tests and small labs; production uses the fleet's own CA"
EXPIRY_WARNING_DAYS = 30


def _translated(handler: Handler) -> Handler:
    """Print a provisioning error as the one line `citygate: reason` and exit 1.

    (Not by raising agent.cli.CommandError: under `python -m agent.cli` that class
    is a different object from the one `main` catches.)
    """

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ProvisionError, LabCaError, PkiError) as exc:
            print(f"citygate: {exc}", file=sys.stderr)
            return 1

    return run


def register(sub: Any) -> None:
    """Entry point `citygate.commands`: add `provision` and its actions."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "provision",
        help="the gateway's key, CSR and certificate; a lab CA",
        description="Provision this gateway's identity: generate its key on the device, "
        "write a CSR for the CA, install the certificate that comes back. "
        "See docs/technician.md.",
    )
    actions = parser.add_subparsers(dest="provision_command", required=True, metavar="ACTION")
    _add_keygen(actions)
    _add_csr(actions)
    _add_install(actions)
    _add_ca(actions)
    register_seed(actions)
    register_enroll(actions)
    register_registrar(actions)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"the gateway's config; its [identity] names the files (default: {DEFAULT_CONFIG})",
    )


def _add_keygen(actions: Any) -> None:
    keygen: argparse.ArgumentParser = actions.add_parser(
        "keygen",
        help="generate the gateway's private key on this device (mode 0600, never printed)",
        description="Generate the gateway's private key where it will live. The key never "
        "leaves the device: it is written with mode 0600 and is never printed.",
    )
    _config_option(keygen)
    keygen.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="directory for the key (default: the directory of identity.key in the config)",
    )
    keygen.add_argument(
        "--ec", action="store_true", help="ECDSA P-256 instead of Ed25519 (for secure elements)"
    )
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key (it is kept as <name>.old; its certificate stops working)",
    )
    keygen.add_argument(
        "--owner",
        metavar="USER",
        help=f"user that owns the key file (default when run as root: {SERVICE_USER!r} if it "
        "exists)",
    )
    keygen.set_defaults(handler=_translated(_cmd_keygen))


def _add_csr(actions: Any) -> None:
    csr: argparse.ArgumentParser = actions.add_parser(
        "csr",
        help="write a certificate signing request (CN = gateway id) signed by the gateway key",
        description="Write a CSR for the CA: the subject is CN=<gateway id> plus the board's "
        "serial number where the device tree has one. The CSR holds no secret.",
    )
    _config_option(csr)
    csr.add_argument("--gateway-id", required=True, metavar="ID", help="the gateway id (the CN)")
    csr.add_argument("--key", type=Path, help="the key file (default: identity.key of the config)")
    csr.add_argument(
        "--out",
        metavar="FILE",
        help="where to write the CSR, '-' for standard output "
        "(default: <gateway id>.csr next to the key)",
    )
    serial = csr.add_mutually_exclusive_group()
    serial.add_argument(
        "--serial", help="serial number to put in the subject instead of the board's"
    )
    serial.add_argument(
        "--no-serial", action="store_true", help="put no serial number in the subject"
    )
    csr.set_defaults(handler=_translated(_cmd_csr))


def _add_install(actions: Any) -> None:
    install: argparse.ArgumentParser = actions.add_parser(
        "install-cert",
        help="check a certificate against the gateway key and CA, then install it",
        description="Install the gateway certificate that the CA returned, after the checks "
        "the agent makes at start-up: it matches the gateway key, is valid now, was issued by "
        "a CA of the configured bundle, and names a valid gateway id. The old certificate is "
        "kept as <name>.old.",
    )
    _config_option(install)
    install.add_argument("cert", type=Path, metavar="CERT", help="the certificate file (PEM)")
    install.add_argument(
        "--chain",
        type=Path,
        metavar="FILE",
        help="intermediate CA certificates to install after the certificate (PEM, issuer first)",
    )
    install.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="the CA bundle that came with the certificate; installed as identity.ca only "
        "when the gateway has none yet (first enrollment)",
    )
    install.set_defaults(handler=_translated(_cmd_install))


def _add_ca(actions: Any) -> None:
    ca: argparse.ArgumentParser = actions.add_parser(
        "ca", help=f"a lab CA ({LAB})", description=f"A lab certificate authority. {LAB}."
    )
    ca_actions = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    init: argparse.ArgumentParser = ca_actions.add_parser(
        "init",
        help=f"create a lab CA in DIR ({LAB})",
        description=f"Create ca.key (mode 0600) and ca.crt in DIR. {LAB}.",
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--name", default="citygate lab CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.set_defaults(handler=_translated(_cmd_ca_init))

    sign: argparse.ArgumentParser = ca_actions.add_parser(
        "sign",
        help=f"sign a gateway CSR with the lab CA in DIR ({LAB})",
        description="Verify the CSR's signature and issue a TLS client certificate with only "
        f"its CN (the gateway id) and serialNumber. {LAB}.",
    )
    sign.add_argument("dir", type=Path, metavar="DIR")
    sign.add_argument("csr", type=Path, metavar="CSR")
    sign.add_argument("--days", type=int, required=True, metavar="N", help="validity in days")
    sign.add_argument(
        "--out", type=Path, metavar="FILE", help="default: <gateway id>.crt next to the CSR"
    )
    sign.set_defaults(handler=_translated(_cmd_ca_sign))


# -- handlers --------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config is not None else DEFAULT_CONFIG


def _no_config(config: Path) -> ProvisionError:
    return ProvisionError(
        f"no gateway config at {config}: pass --config FILE (or --out DIR for the key)"
    )


def _cmd_keygen(args: argparse.Namespace) -> int:
    config = _config_path(args)
    if args.out is not None:
        name = DEFAULT_KEY_NAME
        if args.config is not None or config.exists():
            name = identity_paths(config).key.name
        path = Path(args.out) / name
    elif config.exists():
        path = identity_paths(config).key
    else:
        raise _no_config(config)
    owner = resolve_owner(args.owner)
    made = generate_device_key(
        path, kind="p256" if args.ec else "ed25519", force=args.force, owner=owner
    )
    owned = f", owner {made.owner.name}" if made.owner else ""
    print(f"wrote {made.kind} key {made.path} (mode 0600{owned}); key id {made.kid}")
    if made.old is not None:
        print(
            f"the previous key is kept as {made.old}; the installed certificate was for it: "
            "make a CSR and install the new certificate"
        )
    print("next: citygate provision csr --gateway-id ID")
    return 0


def _cmd_csr(args: argparse.Namespace) -> int:
    config = _config_path(args)
    if args.key is not None:
        key_path = Path(args.key)
    elif config.exists() or args.config is not None:
        key_path = identity_paths(config).key
    else:
        raise _no_config(config)
    key = load_device_key(key_path)
    serial = None if args.no_serial else (args.serial or hardware_serial())
    pem = csr_pem(build_csr(key, args.gateway_id, serial))
    if args.out == "-":
        sys.stdout.write(pem.decode("ascii"))
        return 0
    out = Path(args.out) if args.out else key_path.parent / f"{args.gateway_id}.csr"
    write_file_atomically(out, pem, 0o644)
    where = f"serialNumber={serial}" if serial else "no hardware serial number"
    print(f"wrote CSR {out}: CN={args.gateway_id}, {where}")
    print("next: take it to the CA; install what comes back with `citygate provision install-cert`")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    paths = identity_paths(_config_path(args))
    result = install_certificate(Path(args.cert), paths, chain_file=args.chain, ca_file=args.ca)
    if result.ca_installed:
        print(f"installed the CA bundle {paths.ca} (from {args.ca})")
    identity = result.identity
    end = identity.not_after
    days = (end - datetime.now(UTC)).days
    if not result.changed:
        print(f"{paths.cert} already holds this certificate (gateway {identity.gateway_id})")
    else:
        chain = f" with {result.chain} CA certificate(s)" if result.chain else ""
        print(
            f"installed {paths.cert}{chain}: gateway {identity.gateway_id}, "
            f"valid until {end:%Y-%m-%d} ({days} days)"
        )
        if result.old is not None:
            print(f"the previous certificate is kept as {result.old}")
    if days < EXPIRY_WARNING_DAYS:
        print(f"warning: the certificate expires in {days} days: renew it soon", file=sys.stderr)
    print("next: restart the service (systemctl restart citygate), then run `citygate doctor`")
    return 0


def _cmd_ca_init(args: argparse.Namespace) -> int:
    cert = init_ca(Path(args.dir), name=args.name, days=args.days)
    print(f"lab CA created: {cert} (its key {Path(args.dir) / 'ca.key'} stays here, mode 0600)")
    print(f"this is a {LAB}")
    return 0


def _cmd_ca_sign(args: argparse.Namespace) -> int:
    csr_path = Path(args.csr)
    ca = load_ca(Path(args.dir))
    csr = read_csr(csr_path)
    cert = sign_csr(ca, csr, csr_path, days=args.days)
    out = Path(args.out) if args.out else csr_path.with_name(f"{gateway_id_of(cert)}.crt")
    write_file_atomically(out, certificate_pem(cert), 0o644)
    print(
        f"issued {out}: {subject_text(cert)}, valid {args.days} days, serial {cert.serial_number:x}"
    )
    print(f"install it on the gateway: citygate provision install-cert {out.name}")
    return 0
