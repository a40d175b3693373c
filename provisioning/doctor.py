"""`citygate doctor`: the technician's checklist, one line per check.

In order: the config; the identity (key permissions, key and certificate
matching, issued by the configured CA) and the certificate's dates; the clock;
the broker step by step (DNS, TCP, TLS, MQTT login with this gateway's
certificate); every sensor's serial port and a real test read through its
driver (only while the agent is stopped); free disk for the spool; the spool's
backlog; updates (the trusted update root, the release links, the update state,
see doctor_ota). Each line is `ok`, `warn`, `fail` or `skip` (not tried because an
earlier check failed); every line that is not ok says what to do. `--json`
prints the same as one JSON object for tools. Exit status 0 when no check
failed (warnings allowed), 1 otherwise.

It is safe to run next to the running service: it writes nothing, opens the
spool read-only, does not touch a serial port the agent holds, and does not
log in to the broker while the agent is connected (see doctor_broker).

Trust: see the check modules; this one only orders and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from provisioning.doctor_broker import check_broker
from provisioning.doctor_checks import Check, Status, check_clock, check_config, check_identity
from provisioning.doctor_device import check_disk, check_sensors, check_spool
from provisioning.doctor_ota import check_updates
from provisioning.identity_tools import DEFAULT_CONFIG
from provisioning.procscan import running_agents

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SENSOR_TIMEOUT_S = 10.0
_COLOURS = {Status.OK: "32", Status.WARN: "33", Status.FAIL: "1;31", Status.SKIP: "2"}
_LABELS = {Status.OK: "ok", Status.WARN: "WARN", Status.FAIL: "FAIL", Status.SKIP: "skip"}


def register(sub: Any) -> None:
    """Entry point `citygate.commands`: add the `doctor` subcommand."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        help="check this gateway: config, identity, clock, broker, sensors, disk, spool, updates",
        description="The technician's checklist. Each line is ok, WARN, FAIL or skip; every "
        "line that is not ok says what to do. Exit status 0 when nothing failed. "
        "Safe to run while the service runs. See docs/technician.md.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"the gateway's config (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds for each network step (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--sensor-timeout",
        type=float,
        default=DEFAULT_SENSOR_TIMEOUT_S,
        help="seconds to wait for each sensor's first reading (longer for a sensor polled "
        f"more slowly) (default: {DEFAULT_SENSOR_TIMEOUT_S:g})",
    )
    parser.set_defaults(handler=_run)


def run_checks(
    config_path: Path, timeout: float, sensor_timeout: float = DEFAULT_SENSOR_TIMEOUT_S
) -> list[Check]:
    """Every check, in the order a technician should read them."""
    config_check, config = check_config(config_path)
    checks = [config_check]
    if config is None:
        checks.append(check_clock(None, config_path, None))
        checks += [
            Check(name, Status.SKIP, "not checked: the config is not usable")
            for name in ("identity", "broker", "sensors", "disk", "spool", "updates")
        ]
        return checks
    agents = running_agents(config_path)
    identity_checks, identity = check_identity(config, datetime.now(UTC))
    checks += identity_checks
    checks.append(check_clock(config, config_path, identity))
    checks += asyncio.run(check_broker(config, identity, timeout, agents))
    checks += check_sensors(config, agents, sensor_timeout)
    checks.append(check_disk(config))
    checks.append(check_spool(config))
    checks += check_updates(config)
    return checks


def _use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def render_text(checks: Sequence[Check], *, colour: bool) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        label = f"{_LABELS[check.status]:<4}"
        if colour:
            label = f"\033[{_COLOURS[check.status]}m{label}\033[0m"
        lines.append(f"{label}  {check.name:<{width}}  {check.line()}")
        lines += [f"{'':4}  {'':<{width}}    {detail}" for detail in check.details]
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    if failed:
        lines.append(
            f"{failed} check(s) failed, {warned} warning(s): fix the FAIL lines from the top"
        )
    elif warned:
        lines.append(f"no check failed; {warned} warning(s) to look at")
    else:
        lines.append("all checks passed")
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    body = {
        "ok": not any(c.status is Status.FAIL for c in checks),
        "checks": [
            {
                "name": c.name,
                "status": c.status.value,
                "message": c.message,
                "hint": c.hint,
                "details": list(c.details),
            }
            for c in checks
        ],
    }
    return json.dumps(body, indent=2)


def _run(args: argparse.Namespace) -> int:
    checks = run_checks(Path(args.config), args.timeout, args.sensor_timeout)
    text = render_json(checks) if args.json else render_text(checks, colour=_use_colour())
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `citygate doctor | head`: the reader left; the status still counts
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if any(c.status is Status.FAIL for c in checks) else 0
