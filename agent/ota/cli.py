"""`citygate ota status|apply|history|guard`: the OTA flow from the command line.

`register(sub)` adds the `ota` command to the `citygate` parser; `main(argv)` runs the
same actions without the `ota` word (`python -m agent.ota.cli apply --repo DIR ...`),
which is what the tests and a release's guard wrapper use.

Exit status: 0 when the action did what was asked or there was nothing to do (up to
date, already in trial); 1 with a one-line reason otherwise (failed, rejected,
self-test failed, busy, waiting for a trusted clock). The guard prints what it did and
exits 0 unless it could not read its config or state: the unit runs it as
`ExecStartPre=-...` so a broken guard never keeps the service from starting.

Trusts: the config file (agent.config checks it) and agent.ota.flow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import ConfigError, load_config
from agent.ota.flow import WAIT_S, OtaError, OtaManager, manager_for
from agent.ota.release import ReleaseError

DEFAULT_CONFIG = Path("/etc/citygate/gateway.toml")

Handler = Callable[[argparse.Namespace], int]


def _manager(args: argparse.Namespace) -> OtaManager:
    root: Path | None = getattr(args, "root", None)
    config = load_config(args.config)
    _check_user(config.gateway.state_dir)
    return manager_for(config, root=root.absolute() if root else None)


def _check_user(state_dir: Path) -> None:
    """root must not create update files the agent (another user) can no longer write."""
    try:
        owner = state_dir.stat().st_uid
    except FileNotFoundError:
        return
    if os.geteuid() == 0 and owner != 0:
        raise OtaError(
            f"{state_dir} belongs to uid {owner}: run this as that user "
            "(sudo -u citygate citygate ota ...), so the agent can still write the update state"
        )


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _status(args: argparse.Namespace) -> int:
    status = _manager(args).status()
    if args.json:
        print(json.dumps(status, sort_keys=True))
        return 0
    print(f"installed: {status['installed']}")
    print(f"current: {status['current']}  committed: {status['committed']}")
    print(f"releases: {', '.join(status['releases']) or '-'}")
    line = f"state: {status['state']}"
    if status.get("target"):
        line += f" (target {status['target']}, attempt {status.get('attempt', 1)})"
    if status["state"] == "trial":
        line += f", {status.get('trial_starts', 0)} start(s)"
    print(line)
    if status.get("error"):
        print(f"last error: {status['error']}")
    print(f"refused: {', '.join(status['refused']) or '-'}")
    return 0


def _repo(text: str | None) -> str | None:
    if text is None or "://" in text:
        return text
    return str(Path(text).absolute())


def _apply(args: argparse.Namespace) -> int:
    outcome = _manager(args).apply(_repo(args.repo), force=args.force, wait_s=args.wait)
    if args.json:
        print(json.dumps({"result": outcome.result, "version": outcome.version,
                          "detail": outcome.detail, "ok": outcome.ok}))  # fmt: skip
    else:
        print(f"{outcome.result}: {outcome.detail}", file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def _history(args: argparse.Namespace) -> int:
    rows = _manager(args).history()
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    for row in rows:
        mark = "" if row["reported"] else " (not yet reported)"
        print(f"{_when(row['time'])} ota_{row['step']} {row['version']}: {row['detail']}{mark}")
    return 0


def _guard(args: argparse.Namespace) -> int:
    print(f"citygate ota guard: {_manager(args).guard()}")
    return 0


def _guarded(handler: Handler) -> Handler:
    """Errors the user can act on become one line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        if not logging.getLogger().handlers:  # the outcome is printed; no bare log lines too
            logging.getLogger().addHandler(logging.NullHandler())
        try:
            return handler(args)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
        except (OtaError, ReleaseError, OSError) as exc:
            print(f"citygate ota {args.ota_command}: {exc}", file=sys.stderr)
        return 1

    return run


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The ota actions, under `parser` (the `ota` subcommand, or a parser of its own)."""
    actions = parser.add_subparsers(dest="ota_command", required=True, metavar="ACTION")
    commands: dict[str, tuple[str, Handler]] = {
        "status": ("the update state, the releases and the refused versions", _status),
        "apply": ("check a repository and install a newer release (switch; restart next)", _apply),
        "history": ("every update step this gateway took", _history),
        "guard": ("before a service start: count a trial start, roll back if due", _guard),
    }
    for name, (help_text, handler) in commands.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"the gateway's config (default: {DEFAULT_CONFIG})",
        )
        if name in ("status", "history", "apply"):
            action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(handler=_guarded(handler))
    apply = actions.choices["apply"]
    apply.add_argument("--repo", help="repository: https:// URL or directory (default: ota.repo)")
    apply.add_argument("--root", type=Path, help="release root (default: ota.root)")
    apply.add_argument("--force", action="store_true", help="also consider versions refused before")
    apply.add_argument(
        "--wait",
        type=float,
        default=WAIT_S,
        metavar="SECONDS",
        help=f"wait this long for another update run to finish (default: {WAIT_S:g})",
    )


def register(sub: Any) -> None:
    """Add `citygate ota ...` to the subparsers `sub` of agent.cli's build_parser."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "ota", help="signed over-the-air updates: status, apply, history, guard"
    )
    add_commands(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m agent.ota.cli ACTION ...` (the `citygate ota` actions)."""
    parser = argparse.ArgumentParser(prog="citygate ota", description=__doc__.splitlines()[0])
    add_commands(parser)
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
