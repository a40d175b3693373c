"""`citygate demo`: the whole system on one machine, then a summary.

It makes a throwaway CA with broker, gateway and verifier certificates, starts
a local mosquitto with mutual TLS and the per-gateway ACL on a free loopback
port, starts emulated PMS5003 sensors on pseudo-terminals, runs the real agent
(`citygate run`) as a separate process, and verifies every message it
publishes with an independent subscriber, printing the readings live. At the
end it stops the sensors, lets the agent flush and drain, and prints what was
produced, sent, verified, failed and lost. Every process it started is stopped.

Lab tooling: the certificates it makes are for this demo only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.envelope import VerificationError, VerifiedMessage
from agent.verify import Verifier, subscribe_and_verify, trust_store
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import BrokerError, LabBroker
from provisioning.pki import LabFiles, make_lab_pki

GATEWAY_ID = "demo-gw-1"
QUANTITIES_PER_FRAME = 3  # pm1, pm2_5, pm10


class DemoError(Exception):
    """The demo could not run; the message says what to do."""


def register(sub: Any) -> None:
    """Entry point `citygate.commands`: add the `demo` subcommand."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the whole system on this machine with emulated sensors"
    )
    parser.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--sensors", type=int, default=2, help="emulated PMS5003 sensors")
    parser.add_argument("--workdir", type=Path, help="keep certificates, config and logs here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="do not print live readings")
    parser.set_defaults(handler=_run)


@dataclass
class Summary:
    produced: int = 0
    messages_sent: int = 0
    verified: int = 0
    failed_verification: int = 0
    readings_received: int = 0
    lost: int = 0
    agent_exit: int | None = None

    def ok(self) -> bool:
        return self.lost == 0 and self.failed_verification == 0 and self.agent_exit == 0


def _run(args: argparse.Namespace) -> int:
    if args.sensors < 1:
        raise DemoError("--sensors must be at least 1")
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
        sensors = {}
        for index in range(args.sensors):
            emulator = Pms5003Emulator(period_s=1.0, seed=index + 1, wait_for_host=True)
            stack.enter_context(emulator)
            sensors[f"air_{index + 1}"] = emulator
        modes = {sid: ("active" if i % 2 == 0 else "passive") for i, sid in enumerate(sensors)}
        for sid, emulator in sensors.items():
            say(f"  emulated PMS5003 {sid} ({modes[sid]} mode) on {emulator.port}")
        config = _write_config(workdir, lab, broker, sensors, modes)
        verifier = Verifier(trust_store(lab.ca_cert, [lab.clients[GATEWAY_ID][0]]))
        rig = _Rig(workdir, lab, broker, sensors, config, verifier)
        return await _run_agent_and_verifier(rig, args)


@dataclass(frozen=True)
class _Rig:
    workdir: Path
    lab: LabFiles
    broker: LabBroker
    sensors: dict[str, Pms5003Emulator]
    config: Path
    verifier: Verifier


async def _run_agent_and_verifier(rig: _Rig, args: argparse.Namespace) -> Summary:
    say = _printer(args.quiet)
    workdir, lab, broker, sensors, config, verifier = (
        rig.workdir, rig.lab, rig.broker, rig.sensors, rig.config, rig.verifier
    )  # fmt: skip
    cert, key = lab.clients["verifier"]
    settings = broker.session_settings(
        cert, key, lab.ca_cert, client_id="verifier", persistent=True
    )
    stop_verifier = asyncio.Event()
    subscribed = asyncio.Event()
    verifier_task = asyncio.create_task(
        subscribe_and_verify(
            settings,
            verifier,
            on_verified=_live_printer(say),
            on_failed=lambda topic, exc: say(f"  FAILED verification on {topic}: {exc}"),
            stop=stop_verifier,
            subscribed=subscribed,
        ),
        name="demo-verifier",
    )
    async with asyncio.timeout(15):
        await subscribed.wait()  # subscribed before the agent sends anything
    log_path = workdir / "agent.log"
    say(f"  agent: citygate run --config {config}  (log: {log_path})")
    say("live readings (each line: one message, verified with the gateway's certificate):")
    with log_path.open("wb") as log_file:
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--config", str(config),
            stdout=log_file, stderr=log_file,
        )  # fmt: skip
        try:
            await _wait_for_end(args.duration, agent)
        finally:
            for emulator in sensors.values():
                emulator.set_silent(True)  # no more frames; the agent reads what is in flight
            await asyncio.sleep(1.0)
            if agent.returncode is None:
                agent.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await agent.wait()
            except TimeoutError:
                agent.kill()
                await agent.wait()
    produced = sum(e.frames_sent for e in sensors.values()) * QUANTITIES_PER_FRAME
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while verifier.readings < produced:  # noqa: ASYNC110 - counts live in the verifier
                await asyncio.sleep(0.05)
    stop_verifier.set()
    await verifier_task
    if agent.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        say("agent log (last lines):\n  " + "\n  ".join(tail))
    return Summary(
        produced=produced,
        messages_sent=len(verifier.seen),
        verified=verifier.verified,
        failed_verification=verifier.failed,
        readings_received=verifier.readings,
        lost=max(0, produced - verifier.readings),
        agent_exit=agent.returncode,
    )


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


def _write_config(
    workdir: Path,
    lab: LabFiles,
    broker: LabBroker,
    sensors: dict[str, Pms5003Emulator],
    modes: dict[str, str],
) -> Path:
    cert, key = lab.clients[GATEWAY_ID]
    lines = [
        "# written by `citygate demo`",
        "[gateway]",
        f'state_dir = "{workdir / "state"}"',
        "[identity]",
        f'key = "{key}"',
        f'cert = "{cert}"',
        f'ca = "{lab.ca_cert}"',
        "[broker]",
        'host = "localhost"',
        f"port = {broker.port}",
        "backoff_initial_s = 0.2",
        "backoff_max_s = 5.0",
        "[spool]",
        "batch_interval_s = 1.0",
    ]
    for sid, emulator in sensors.items():
        lines += [
            f"[sensors.{sid}]",
            'driver = "pms5003"',
            f'port = "{emulator.port}"',
            f'mode = "{modes[sid]}"',
            "poll_interval_s = 1.0",
        ]
    path = workdir / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _printer(quiet: bool) -> Any:
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return say


def _live_printer(say: Any) -> Any:
    def show(message: VerifiedMessage, _payload: bytes) -> None:
        frames: dict[tuple[str, float], dict[str, object]] = defaultdict(dict)
        for record in message.records:
            frames[(record.sensor, record.t)][record.n] = record.v
        for (sensor, t), values in frames.items():
            stamp = time.strftime("%H:%M:%S", time.localtime(t))
            shown = "  ".join(f"{n} {_num(v)}" for n, v in values.items())
            say(f"  {stamp}  seq {message.seq:<4} {sensor:<8} {shown} ug/m3  verified")

    return show


def _num(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _print_summary(summary: Summary, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.__dict__))
        return
    print("summary:")
    print(f"  readings produced     {summary.produced}")
    print(f"  messages sent         {summary.messages_sent}")
    print(f"  verified              {summary.verified}")
    print(f"  failed verification   {summary.failed_verification}")
    print(f"  readings received     {summary.readings_received}")
    print(f"  lost                  {summary.lost}")
    if summary.agent_exit != 0:
        print(f"  agent exit status     {summary.agent_exit} (see the agent log)")


__all__ = ["DemoError", "VerificationError", "register"]
