"""A rig brought up for one scenario: sensors, broker, network, observer, and the agent.

`Rig(spec, workdir)` is an async context manager. On entry it makes a lab PKI
(a CA, the broker's certificate, the gateway's and the observer's), starts a
lab mosquitto with mTLS, a `NetProxy` in front of it (the agent's only way to
the broker), the `Observer` on the broker directly (the cloud side is not
behind the gateway's network), and the rig's sensors (emulated, or a real
rig's devices as they are). The agent is started by the scenario, as often as
it likes, with `start_agent`; its config is written by the rig, from the
sensors, the proxy's port and the scenario's tuning. On exit everything that
was started is stopped, whatever happened: the agent first (SIGTERM, SIGKILL
if it does not stop), then the disks, the observer, the sensors, the proxy
and the broker.

Injectors hang off the rig: `proxy` (network), `broker_control`, `power()`,
`disk()`, `clock()`, and `faults(sensor_id)`. `require(fault)` skips the
scenario, with the reason, on a rig that cannot inject the fault.

Trust: the rig is test equipment; the agent is the code under test and is
observed only from outside: its exit status, its log, its state files, /proc,
and the broker.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from hil_tests.faults import BrokerControl, Disk, FakeClock, Power
from hil_tests.netproxy import NetProxy
from hil_tests.observe import Observer, ProcessProbe
from hil_tests.rigfile import RigSpec
from hil_tests.sensors import SENSOR_FAULTS, BoundSensor, SensorFaults, bind_sensors
from provisioning.broker import LabBroker
from provisioning.labconfig import LAB_TUNING, write_gateway_config
from provisioning.pki import LabFiles, make_lab_pki
from tests.agentrig import AgentProcess

#: the agent's config sections for HIL scenarios: the lab's quick reconnects and small
#: batches, a keep-alive short enough for a blackholed link to be noticed within seconds,
#: and a health report every second
HIL_TUNING: Mapping[str, Mapping[str, object]] = {
    "broker": {**LAB_TUNING["broker"], "keepalive_s": 5},
    "spool": dict(LAB_TUNING["spool"]),
    "health": {"interval_s": 1.0},
}
RUN_SUMMARY = "last-run.json"
_STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class AgentRun:
    """How a clean stop ended: the exit status, and the agent's last-run.json (None if it
    wrote none: it was killed, or crashed)."""

    returncode: int
    summary: Mapping[str, object] | None


class Rig:
    """One rig for one scenario; see the module docstring. `gateway` is the agent's id;
    `operator` is an identity the broker lets send commands and update offers to it."""

    gateway = "gw-a"
    operator = "operator"

    def __init__(
        self,
        spec: RigSpec,
        workdir: Path,
        *,
        tuning: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.tuning = _merged(HIL_TUNING, tuning or {})
        self.config_path = workdir / "gateway.toml"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "agent.log"
        self.agent = AgentProcess(self.config_path, self.log_path)
        self.sensors: dict[str, BoundSensor] = {}
        self._sensor_env: dict[str, str] = {}
        self._stack = contextlib.ExitStack()
        self._observer: Observer | None = None
        self._lab: LabFiles | None = None
        self._broker: LabBroker | None = None
        self._proxy: NetProxy | None = None
        self._broker_control: BrokerControl | None = None
        self._spool_file = self.state_dir / "spool.sqlite"
        self._disks: list[Disk] = []

    # -- parts (valid inside `async with`) ----------------------------------------------------

    @property
    def lab(self) -> LabFiles:
        assert self._lab is not None, "the rig is not running"
        return self._lab

    @property
    def broker(self) -> LabBroker:
        assert self._broker is not None, "the rig is not running"
        return self._broker

    @property
    def proxy(self) -> NetProxy:
        """The network between the agent and the broker: cut, blackhole, slow, reset."""
        assert self._proxy is not None, "the rig is not running"
        return self._proxy

    @property
    def observer(self) -> Observer:
        assert self._observer is not None, "the rig is not running"
        return self._observer

    @property
    def broker_control(self) -> BrokerControl:
        """The broker as something that fails: stop, start, restart with a new certificate."""
        assert self._broker_control is not None, "the rig is not running"
        return self._broker_control

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lab = make_lab_pki(
            self.workdir / "pki", clients=[self.gateway, "verifier", self.operator]
        )
        lab = self._lab
        self._broker = self._stack.enter_context(
            LabBroker(
                self.workdir / "broker",
                ca_cert=lab.ca_cert,
                server_cert=lab.server_cert,
                server_key=lab.server_key,
                operators=[self.operator],
            )
        )
        self._broker_control = BrokerControl(self._broker, lab)
        self._proxy = self._stack.enter_context(
            NetProxy(self._broker.host, self._broker.port, name="broker-link")
        )
        self._observer = Observer(lab, self._broker, [self.gateway])
        await self._observer.start()
        bound = bind_sensors(
            self._stack, self.spec.sensors, emulated=self.spec.emulated, devdir=self.workdir / "dev"
        )
        self.sensors = bound.sensors
        self._sensor_env = bound.environment

    async def close(self) -> None:
        """Stop everything that was started, the agent first; safe to call twice."""
        try:
            await self._end_agent()
        finally:
            try:
                for disk in reversed(self._disks):
                    disk.__exit__(None, None, None)
                self._disks.clear()
            finally:
                try:
                    if self._observer is not None:
                        await self._observer.stop()
                finally:
                    self._stack.close()

    async def _end_agent(self) -> None:
        proc = self.agent.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(TimeoutError):  # AgentProcess.stop has killed it then
            await self.agent.stop(_STOP_GRACE_S)

    # -- capabilities ------------------------------------------------------------------------

    def require(self, fault: str, sensor: str | None = None) -> None:
        """Skip the scenario unless this rig can inject `fault` (for `sensor`, if a sensor
        fault): "network", "broker", "power", "disk", "clock", or a sensor fault
        ("unplug", "noise", "bad_checksum", "silence", "modbus_exception", "slow")."""
        if fault in SENSOR_FAULTS:
            if not self.spec.supports("sensors"):
                pytest.skip(f"rig {self.spec.name} does not inject sensor faults ({fault})")
            faults = self.faults(sensor) if sensor is not None else None
            if faults is not None and not faults.supports(fault):
                pytest.skip(f"rig {self.spec.name}: {faults.why_not(fault)}")
            return
        if not self.spec.supports(fault):
            pytest.skip(f"rig {self.spec.name} does not inject {fault} faults (its `faults` list)")
        if fault == "clock" and not FakeClock.available():
            pytest.skip("clock faults need libfaketime (Debian package libfaketime)")

    def faults(self, sensor_id: str) -> SensorFaults:
        return self.sensors[sensor_id].faults

    def power(self) -> Power:
        return Power(self.kill_agent)

    def disk(self, size_bytes: int = 4 << 20, *, mode: str | None = None) -> Disk:
        """A spool directory of `size_bytes` that can fill up; give it to `start_agent(spool=)`.
        Unmounted when the rig closes (after the agent has stopped)."""
        disk = Disk(self.workdir / f"spool-disk-{len(self._disks)}", size_bytes, mode=mode)
        disk.__enter__()
        self._disks.append(disk)
        return disk

    def clock(self) -> FakeClock:
        """A libfaketime clock for the agent; pass `clock.environment()` to `start_agent`."""
        return FakeClock(self.workdir / "faketime")

    # -- the agent ------------------------------------------------------------------------------

    def write_agent_config(
        self,
        *,
        spool_dir: Path | None = None,
        tuning: Mapping[str, Mapping[str, object]] | None = None,
    ) -> Path:
        """gateway.toml for the agent: the rig's sensors, the proxy's port, the tuning
        (the rig's, overridden per section and key by `tuning`)."""
        sections = _merged(self.tuning, tuning or {})
        self._spool_file = (spool_dir or self.state_dir) / "spool.sqlite"
        if spool_dir is not None:
            sections = _merged(sections, {"spool": {"path": self._spool_file}})
        return write_gateway_config(
            self.config_path,
            lab=self.lab,
            gateway=self.gateway,
            broker_port=self.proxy.port,
            state_dir=self.state_dir,
            sensors={sid: bound.table for sid, bound in self.sensors.items()},
            tuning=sections,
        )

    async def start_agent(
        self,
        *,
        env: Mapping[str, str] | None = None,
        spool: Disk | Path | None = None,
        tuning: Mapping[str, Mapping[str, object]] | None = None,
    ) -> AgentProcess:
        """Write the config and start `citygate run`. `env` adds to its environment (e.g. a
        FakeClock's); `spool` puts the spool file in that directory (a `Disk`'s, to fill it)."""
        proc = self.agent.proc
        if proc is not None and proc.returncode is None:
            raise RuntimeError("the agent is already running: stop or kill it first")
        disk = spool if isinstance(spool, Disk) else None
        spool_dir = spool.path if isinstance(spool, Disk) else spool
        self.write_agent_config(spool_dir=spool_dir, tuning=tuning)
        (self.state_dir / RUN_SUMMARY).unlink(missing_ok=True)  # a summary is this run's or none
        self.agent.env = {**self._sensor_env, **(env or {})}
        await self.agent.start()
        if disk is not None:
            disk.attach(self.pid)
        return self.agent

    async def kill_agent(self) -> None:
        """A power cut: SIGKILL."""
        await self.agent.kill()

    async def stop_agent(self, grace_s: float = _STOP_GRACE_S) -> AgentRun:
        """A clean stop: SIGTERM, wait, and read what the agent said about its run."""
        returncode = await self.agent.stop(grace_s)
        return AgentRun(returncode, self.last_run())

    async def restart_agent(
        self,
        *,
        kill: bool = False,
        env: Mapping[str, str] | None = None,
        spool: Disk | Path | None = None,
        tuning: Mapping[str, Mapping[str, object]] | None = None,
    ) -> AgentProcess:
        """Stop (or with `kill`, SIGKILL) the running agent and start it again."""
        if kill:
            await self.kill_agent()
        else:
            await self.stop_agent()
        return await self.start_agent(env=env, spool=spool, tuning=tuning)

    @property
    def pid(self) -> int:
        proc = self.agent.proc
        if proc is None:
            raise RuntimeError("the agent has not been started")
        return proc.pid

    @property
    def agent_running(self) -> bool:
        proc = self.agent.proc
        return proc is not None and proc.returncode is None

    def probe(self) -> ProcessProbe:
        """A /proc probe of the running agent (a new one after each restart)."""
        return ProcessProbe(self.pid)

    def last_run(self) -> Mapping[str, object] | None:
        """state_dir/last-run.json of the last clean stop of this run, if written."""
        path = self.state_dir / RUN_SUMMARY
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return loaded if isinstance(loaded, dict) else None

    @property
    def spool_path(self) -> Path:
        """The spool file of the last config written (for tests.agentrig.read_spool)."""
        return self._spool_file

    def agent_log(self) -> str:
        return self.agent.output() if self.log_path.exists() else ""


def _merged(
    base: Mapping[str, Mapping[str, object]], over: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    merged = {name: dict(values) for name, values in base.items()}
    for name, values in over.items():
        merged.setdefault(name, {}).update(values)
    return merged
