"""The `citygate` command line (DESIGN.md §6).

Every command has --help, exits 0 on success and 1 with a one-line reason on
failure. Commands that other packages provide (the demo, provisioning) are
found through the `citygate.commands` entry-point group, so the agent never
imports the packages that depend on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from agent import version
from agent.config import ConfigError, load_config
from agent.identity import IdentityError
from agent.logging_setup import configure_logging
from agent.seq import SeqError
from agent.spool import SpoolError
from drivers import family, family_names

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A command failed for a reason the user can act on; printed as one line."""


def _configure_logging(level: str) -> None:
    configure_logging(level)


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.service import PlaintextRefused, run_service

    config = load_config(Path(args.config))
    _configure_logging(args.log_level or config.gateway.log_level)
    try:
        return run_service(config, allow_plaintext=args.insecure_plaintext_for_development)
    except PlaintextRefused as exc:
        raise CommandError(str(exc)) from None


def _cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file), check_devices=True)
    if not config.broker.tls:
        print(
            f"{args.file}: warning: broker.tls = false: plaintext MQTT, refused by `citygate run` "
            "unless started with --insecure-plaintext-for-development",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"ok": True, "file": args.file, "sensors": len(config.sensors)}))
    else:
        print(f"{args.file}: ok ({len(config.sensors)} sensor(s))")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    try:
        fam = family(args.driver)
    except KeyError:
        raise CommandError(
            f"unknown driver {args.driver!r}; known: {', '.join(family_names())}"
        ) from None
    params = {
        name: value
        for name, value in (("mac", args.mac), ("key", args.key), ("profile", args.profile))
        if value is not None
    }
    failed = 0
    for text in args.hex:
        result: dict[str, object]
        try:
            decoded = fam.decode(bytes.fromhex(text), params)
            records = [{"n": n, "u": u, "v": v} for n, u, v in decoded.records]
            result = {"ok": True, "records": records}
            if decoded.note:
                result["note"] = decoded.note
        except ValueError as exc:
            failed += 1
            result = {"ok": False, "error": str(exc)}
        print(json.dumps(result))
    return 1 if failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from agent.verify import run_verify_command

    _configure_logging(args.log_level or "warning")
    return run_verify_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citygate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"citygate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway service")
    run.add_argument("--config", required=True, help="the gateway's TOML config file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--insecure-plaintext-for-development",
        action="store_true",
        help="allow broker.tls = false (plaintext MQTT) on a development bench; never in the field",
    )
    run.set_defaults(handler=_cmd_run)

    config = sub.add_parser("config", help="work with config files")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.add_argument("--json", action="store_true", help="print a JSON result")
    check.set_defaults(handler=_cmd_config_check)

    decode = sub.add_parser("decode", help="decode raw frames as hex; one JSON object per input")
    decode.add_argument("driver", help=f"driver name ({', '.join(family_names())})")
    decode.add_argument("hex", nargs="+", help="frame bytes in hex (spaces allowed if quoted)")
    decode.add_argument("--mac", help="BLE device address, for encrypted BTHome")
    decode.add_argument("--key", help="BTHome bind key (32 hex digits)")
    decode.add_argument(
        "--profile",
        help="Modbus register map (a profile name or a TOML file), or a serial sensor model",
    )
    decode.set_defaults(handler=_cmd_decode)

    from agent.verify import add_verify_arguments

    verify = sub.add_parser("verify", help="subscribe and verify signed telemetry")
    add_verify_arguments(verify)
    verify.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    verify.set_defaults(handler=_cmd_verify)

    from agent import selftest

    check_release = sub.add_parser(
        "selftest", help="check that this installed release works (imports, signing, config)"
    )
    selftest.add_arguments(check_release)
    check_release.set_defaults(handler=selftest.main)

    from agent.ota.cli import register as register_ota

    register_ota(sub)

    for entry in metadata.entry_points(group="citygate.commands"):
        register = entry.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
    except (IdentityError, SpoolError, SeqError, CommandError) as exc:
        print(f"citygate: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    # run the module's importable twin, so plugins raising agent.cli.CommandError are caught
    from agent.cli import main as _main

    sys.exit(_main())
