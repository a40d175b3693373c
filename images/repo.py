"""The TUF repository that offers citygate bundles to gateways: `python -m images.repo`.

Commands (all keep the layout gateways fetch from; publish DIR/metadata and DIR/targets):

    python -m images.repo init DIR [--keys KEYS] [--root-keys 3 --root-threshold 2 ...]
    python -m images.repo add DIR BUNDLE [--channel stable] [--hardware H ...] [--min-version V]
    python -m images.repo remove DIR VERSION
    python -m images.repo sign DIR [--role root|targets ...]   # run daily: timestamp lasts 1 day
    python -m images.repo rotate DIR ROLE

The repository itself (layout, roles, keys, signing) is images.tufrepo; its public names
are re-exported here. Keys live in KEYS/<role>/<keyid>.pem (default KEYS = DIR/keys).

Publish DIR/metadata and DIR/targets only, never DIR itself (nor copy DIR to a stick):
the default key directory is inside it. In production keep the root and targets keys
offline and pass every key directory a command needs: `--keys /media/offline --keys
/srv/online-keys` (repeatable; `init` and `rotate` write new keys into the first).

Trust: this tool trusts the key files under KEYS (it refuses any readable by group or
others) and the bundle manifest it is given; it signs whatever bundle it is told to add.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from images.tufrepo import (
    EXPIRY_DAYS,
    PRODUCT,
    ROLES,
    BundleInfo,
    Policy,
    RepoError,
    Repository,
    expiry,
    target_path,
)

__all__ = [
    "EXPIRY_DAYS",
    "PRODUCT",
    "ROLES",
    "BundleInfo",
    "Policy",
    "RepoError",
    "Repository",
    "expiry",
    "main",
    "run",
    "target_path",
]


def _bundle_info(bundle: Path, args: argparse.Namespace) -> BundleInfo:
    """The bundle's manifest (agent.ota.bundle) or, failing that, --version/--platform/--python."""
    if args.version and args.platform and args.python:
        return BundleInfo(args.version, args.platform, args.python)
    try:
        from agent.ota.bundle import BundleError, read_manifest
    except ImportError:
        raise RepoError(
            f"{bundle}: agent.ota.bundle is not available; pass --version, --platform, --python"
        ) from None
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        raise RepoError(f"{bundle}: not a citygate bundle: {exc}") from exc
    if manifest.name != PRODUCT:
        raise RepoError(f"{bundle}: manifest name is {manifest.name!r}, not {PRODUCT!r}")
    return BundleInfo(
        args.version or manifest.version,
        args.platform or manifest.platform,
        args.python or manifest.python,
    )


def _policy(args: argparse.Namespace) -> Policy:
    days = dict(EXPIRY_DAYS)
    for role in ROLES:
        value = getattr(args, f"{role}_expiry_days", None)
        if value is not None:
            days[role] = value
    return Policy(
        root_keys=getattr(args, "root_keys", 3),
        root_threshold=getattr(args, "root_threshold", 2),
        targets_keys=getattr(args, "targets_keys", 2),
        targets_threshold=getattr(args, "targets_threshold", 1),
        expiry_days=days,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m images.repo", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "init": "create keys and version 1 of every role",
        "add": "offer a bundle",
        "remove": "stop offering a version",
        "sign": "re-sign snapshot and timestamp (and --role ones) with fresh expiry",
        "rotate": "replace the keys of a role",
    }
    for name, help_text in commands.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("dir", type=Path, help="repository directory")
        cmd.add_argument(
            "--keys",
            type=Path,
            action="append",
            default=[],
            help="key directory, repeatable; new keys go into the first (default DIR/keys)",
        )
        for role in ROLES:
            cmd.add_argument(
                f"--{role}-expiry-days",
                type=float,
                metavar="DAYS",
                help=f"{role} validity (default {EXPIRY_DAYS[role]})",
            )
    init = sub.choices["init"]
    init.add_argument("--root-keys", type=int, default=3)
    init.add_argument("--root-threshold", type=int, default=2)
    init.add_argument("--targets-keys", type=int, default=2)
    init.add_argument("--targets-threshold", type=int, default=1)
    add = sub.choices["add"]
    add.add_argument("bundle", type=Path)
    add.add_argument("--channel", default="stable")
    add.add_argument("--hardware", nargs="+", default=["*"], help="hardware names, * for all")
    add.add_argument("--min-version", default="0.0.0", help="lowest installed version it updates")
    add.add_argument("--version", help="override/replace the manifest's version")
    add.add_argument("--platform", help="override/replace the manifest's platform")
    add.add_argument("--python", help="override/replace the manifest's python")
    add.add_argument("--replace", action="store_true", help="offer other bytes for a version")
    sub.choices["remove"].add_argument("version")
    sub.choices["sign"].add_argument(
        "--role",
        action="append",
        choices=["root", "targets"],
        default=[],
        help="also re-sign this offline role",
    )
    sub.choices["rotate"].add_argument("role", choices=ROLES)
    return parser


def run(args: argparse.Namespace) -> str:
    """Run one parsed command; return what to print."""
    if args.command == "init":
        repo = Repository.create(args.dir, args.keys, _policy(args))
        return (
            f"{args.dir}: new repository; ship {repo.metadata_dir / '1.root.json'} to gateways; "
            f"publish metadata/ and targets/ only; keep root and targets keys offline"
        )
    repo = Repository.load(args.dir, args.keys)
    repo.policy = replace(repo.policy, expiry_days=_policy(args).expiry_days)
    if args.command == "add":
        info = _bundle_info(args.bundle, args)
        target = repo.add_bundle(
            args.bundle,
            info,
            channel=args.channel,
            hardware=args.hardware,
            min_version=args.min_version,
            replace=args.replace,
        )
        return f"offered {target.path} ({target.length} bytes, {args.channel})"
    if args.command == "remove":
        repo.remove_version(args.version)
        return f"no longer offered: {target_path(args.version)}"
    if args.command == "sign":
        for role in ("root", "targets"):
            if role in args.role:
                repo.publish(role)
        repo.publish_online()
        return f"signed timestamp {repo.metadata('timestamp').signed.version}"
    repo.rotate(args.role)
    return f"{args.role}: new keys; root is now version {repo.root.version}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except (RepoError, OSError, ValueError) as exc:
        print(f"images.repo {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
