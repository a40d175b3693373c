"""Test rig: the real agent as a subprocess, emulated sensors, a capturing verifier.

The agent is observed only from outside: its exit status and log, its spool
file (read-only, to learn what it had committed), and what reaches the broker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.envelope import VerificationError, VerifiedMessage
from agent.verify import Verifier, subscribe_and_verify, trust_store
from provisioning.broker import LabBroker
from provisioning.labconfig import write_gateway_config
from provisioning.pki import LabFiles


def write_config(
    directory: Path,
    lab: LabFiles,
    port: int,
    sensors: Mapping[str, str | Mapping[str, object]],
    *,
    gateway: str = "gw-a",
) -> Path:
    """directory/gateway.toml for `gateway`; a bare port string means a PMS5003 on it."""
    tables = {
        sid: {"driver": "pms5003", "port": given} if isinstance(given, str) else given
        for sid, given in sensors.items()
    }
    return write_gateway_config(
        directory / "gateway.toml",
        lab=lab,
        gateway=gateway,
        broker_port=port,
        state_dir=directory / "state",
        sensors=tables,
    )


def citygate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command line as a user does: a subprocess; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class AgentProcess:
    """`citygate run` in a subprocess, its output in a log file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.args = list(args)  # extra `citygate run` arguments
        self.env = dict(env) if env is not None else None  # added to this process's environment
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", "run", "--config", str(self.config),
                *self.args, stdout=out, stderr=out,
                env=None if self.env is None else {**os.environ, **self.env},
            )  # fmt: skip

    async def kill(self) -> None:
        """Power cut: SIGKILL, no chance to flush."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, grace_s: float = 15.0) -> int:
        """Clean stop: SIGTERM and wait."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Capture:
    """Everything the verifier saw, keyed by (gateway, seq), raw bytes kept."""

    verifier: Verifier
    raw: dict[tuple[str, int], list[bytes]] = field(default_factory=lambda: defaultdict(list))
    messages: list[VerifiedMessage] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def readings(self) -> set[tuple[str, str, float, float]]:
        unique: dict[tuple[str, int], VerifiedMessage] = {}
        for message in self.messages:
            unique[(message.gateway_id, message.seq)] = message
        return {
            (r.sensor, r.n, round(r.t, 3), float(r.v))
            for message in unique.values()
            for r in message.records
        }


async def capture(
    lab: LabFiles,
    broker: LabBroker,
    out: Capture,
    stop: asyncio.Event,
    subscribed: asyncio.Event | None = None,
) -> None:
    """Subscribe as the verifier until `stop`, with a persistent session (as a cloud
    consumer would), so messages published while it reconnects are queued for it."""
    cert, key = lab.clients["verifier"]
    settings = broker.session_settings(
        cert, key, lab.ca_cert, client_id="verifier", persistent=True
    )

    def verified(message: VerifiedMessage, payload: bytes) -> None:
        out.raw[(message.gateway_id, message.seq)].append(payload)
        out.messages.append(message)

    def failed(topic: str, exc: VerificationError) -> None:
        out.failures.append(f"{topic}: {exc}")

    await subscribe_and_verify(
        settings, out.verifier, on_verified=verified, on_failed=failed, stop=stop,
        subscribed=subscribed,
    )  # fmt: skip


def new_capture(lab: LabFiles, gateways: list[str]) -> Capture:
    return Capture(Verifier(trust_store(lab.ca_cert, [lab.clients[g][0] for g in gateways])))


@dataclass(frozen=True)
class SpoolSnapshot:
    """What the spool file had committed: outbox messages and unpacked readings."""

    outbox: dict[int, bytes]
    readings: set[tuple[str, str, float, float]]


def read_spool(path: Path) -> SpoolSnapshot:
    uri = f"file:{os.fspath(path)}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        outbox = {seq: bytes(p) for seq, p in db.execute("SELECT seq, payload FROM outbox")}
        readings = {
            (sensor, quantity, round(t, 3), float(value))
            for sensor, quantity, t, value in db.execute(
                "SELECT c.sensor, c.quantity, r.t, r.value "
                "FROM readings r JOIN channels c ON c.id = r.channel"
            )
        }
    finally:
        db.close()
    return SpoolSnapshot(outbox, readings)
