"""`citygate demo`: the whole system on one machine, then a summary.

It makes a throwaway CA with broker, gateway and verifier certificates, starts
a local mosquitto with mutual TLS and the per-gateway ACL on a free loopback
port, starts emulated sensors of every family on their real transports
(`provisioning.demo_sensors`), runs the real agent (`citygate run`) as a
separate process, and verifies every message it publishes with an independent
subscriber, printing the readings live. At the end it stops the agent
cleanly and prints what the agent accepted, what was sent, verified, failed
and lost. Every process it started is stopped.

"Lost" is what the agent accepted from its sensors (its own count, written to
`last-run.json` when it stops) minus what the verifier received and what is
still spooled: the end-to-end promise of the spool. Per sensor, it shows how
many verified readings arrived.

Lab tooling: the certificates it makes are for this demo only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.envelope import VerifiedMessage
from agent.verify import Verifier, subscribe_and_verify, trust_store
from provisioning.broker import BrokerError, LabBroker
from provisioning.demo_sensors import DemoSensor, start_sensors
from provisioning.labconfig import write_gateway_config
from provisioning.pki import make_lab_pki

GATEWAY_ID = "demo-gw-1"

Say = Callable[[str], None]


class DemoError(Exception):
    """The demo could not run; the message says what to do."""


def register(sub: Any) -> None:
    """Entry point `citygate.commands`: add the `demo` subcommand."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the whole system on this machine with emulated sensors"
    )
    parser.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--workdir", type=Path, help="keep certificates, config and logs here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="do not print live readings")
    parser.set_defaults(handler=_run)


@dataclass
class Summary:
    accepted: int = 0
    messages_sent: int = 0
    verified: int = 0
    failed_verification: int = 0
    readings_received: int = 0
    still_spooled: int = 0
    lost: int = 0
    agent_exit: int | None = None
    per_sensor: dict[str, int] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.failed_verification == 0
            and self.agent_exit == 0
            and all(self.per_sensor.get(sid, 0) > 0 for sid in self.families)
        )


def _run(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="citygate-demo-"))
    try:
        summary = asyncio.run(_demo(workdir, args))
    except BrokerError as exc:
        print(f"citygate demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    _print_summary(summary, as_json=args.json)
    return 0 if summary.ok() else 1


async def _demo(workdir: Path, args: argparse.Namespace) -> Summary:
    say = _printer(args.quiet)
    say(f"citygate demo in {workdir}")
    lab = make_lab_pki(workdir / "pki", clients=[GATEWAY_ID, "verifier"])
    say("  throwaway CA, broker, gateway and verifier certificates: made")
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(
            LabBroker(
                workdir / "broker",
                ca_cert=lab.ca_cert,
                server_cert=lab.server_cert,
                server_key=lab.server_key,
            )
        )
        say(f"  mosquitto with mutual TLS and per-gateway ACL: 127.0.0.1:{broker.port}")
        sensors, env = start_sensors(stack, workdir)
        for sensor in sensors:
            say(f"  {sensor.sensor_id:<8} {sensor.description}")
        config = write_gateway_config(
            workdir / "gateway.toml",
            lab=lab,
            gateway=GATEWAY_ID,
            broker_port=broker.port,
            state_dir=workdir / "state",
            sensors={s.sensor_id: s.table for s in sensors},
        )
        verifier = Verifier(trust_store(lab.ca_cert, [lab.clients[GATEWAY_ID][0]]))
        cert, key = lab.clients["verifier"]
        settings = broker.session_settings(
            cert, key, lab.ca_cert, client_id="verifier", persistent=True
        )
        per_sensor: Counter[str] = Counter()
        stop_verifier = asyncio.Event()
        subscribed = asyncio.Event()
        verifier_task = asyncio.create_task(
            subscribe_and_verify(
                settings,
                verifier,
                on_verified=_live_printer(say, per_sensor),
                on_failed=lambda topic, exc: say(f"  FAILED verification on {topic}: {exc}"),
                stop=stop_verifier,
                subscribed=subscribed,
            ),
            name="demo-verifier",
        )
        async with asyncio.timeout(15):
            await subscribed.wait()  # subscribed before the agent sends anything
        exit_code = await _run_agent(workdir, config, env, args, say)
        run = _last_run(workdir / "state" / "last-run.json")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while verifier.readings < run.get("accepted", 0) - run.get("spooled_readings", 0):  # noqa: ASYNC110 - counts live in the verifier
                    await asyncio.sleep(0.05)
        stop_verifier.set()
        await verifier_task
    spooled = int(run.get("spooled_readings", 0))
    accepted = int(run.get("accepted", 0))
    return Summary(
        accepted=accepted,
        messages_sent=len(verifier.seen),
        verified=verifier.verified,
        failed_verification=verifier.failed,
        readings_received=verifier.readings,
        still_spooled=spooled,
        lost=max(0, accepted - verifier.readings - spooled),
        agent_exit=exit_code,
        per_sensor=dict(per_sensor),
        families={s.sensor_id: s.family for s in sensors},
    )


async def _run_agent(
    workdir: Path, config: Path, env: dict[str, str], args: argparse.Namespace, say: Say
) -> int | None:
    log_path = workdir / "agent.log"
    say(f"  agent: citygate run --config {config}  (log: {log_path})")
    say("live readings (each line: one sensor's values in one message, signature verified):")
    with log_path.open("wb") as log_file:
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--config", str(config),
            stdout=log_file, stderr=log_file, env={**os.environ, **env},
        )  # fmt: skip
        try:
            await _wait_for_end(args.duration, agent)
        finally:
            if agent.returncode is None:
                agent.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await agent.wait()
            except TimeoutError:
                agent.kill()
                await agent.wait()
    if agent.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        say("agent log (last lines):\n  " + "\n  ".join(tail))
    return agent.returncode


def _last_run(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int | float)}


async def _wait_for_end(duration: float | None, agent: asyncio.subprocess.Process) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(agent.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _printer(quiet: bool) -> Say:
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return say


def _live_printer(say: Say, per_sensor: Counter[str]) -> Callable[[VerifiedMessage, bytes], None]:
    def show(message: VerifiedMessage, _payload: bytes) -> None:
        groups: dict[str, list[str]] = defaultdict(list)
        stamps: dict[str, float] = {}
        for record in message.records:
            per_sensor[record.sensor] += 1
            stamps.setdefault(record.sensor, record.t)
            if len(groups[record.sensor]) < 4:
                groups[record.sensor].append(f"{record.n} {_num(record.v)} {record.u}")
        for sensor, shown in groups.items():
            stamp = time.strftime("%H:%M:%S", time.localtime(stamps[sensor]))
            say(f"  {stamp}  seq {message.seq:<4} {sensor:<8} {'  '.join(shown)}  verified")

    return show


def _num(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _print_summary(summary: Summary, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(summary)))
        return
    print("summary:")
    print(f"  readings accepted by the agent  {summary.accepted}")
    print(f"  messages sent                   {summary.messages_sent}")
    print(f"  verified                        {summary.verified}")
    print(f"  failed verification             {summary.failed_verification}")
    print(f"  readings received               {summary.readings_received}")
    print(f"  still spooled                   {summary.still_spooled}")
    print(f"  lost                            {summary.lost}")
    for sensor_id, family in summary.families.items():
        got = summary.per_sensor.get(sensor_id, 0)
        print(f"    {sensor_id:<8} {family:<9} {got} readings verified")
    if summary.agent_exit != 0:
        print(f"  agent exit status               {summary.agent_exit} (see the agent log)")


__all__ = ["DemoError", "DemoSensor", "register"]
