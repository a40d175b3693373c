"""The rig itself, without the agent: its config, its sensors' faults, its skips, its clean-up.

Scenarios rely on these: the config the rig writes is one the agent accepts
and points at the proxy; a sensor fault does to the port what it says; a
fault the rig cannot inject skips with the reason; and nothing is left
running afterwards (the leak check of every test).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from agent.config import load_config
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec, load_rig
from hil_tests.sensors import FaultUnsupported

pytestmark = pytest.mark.integration

RIGS = Path(__file__).resolve().parent / "rigs"


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


def _pty_exists(link: str) -> bool:
    return os.path.exists(os.path.realpath(link))


@pytest.fixture(scope="module")
def emulated() -> RigSpec:
    return load_rig(RIGS / "emulated.toml")


def test_agent_config_names_every_sensor_and_the_proxy_and_loads(
    emulated: RigSpec, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Rig(emulated, tmp_path, tuning={"health": {"interval_s": 2.5}}) as rig:
            disk = rig.disk(2 << 20)
            config = load_config(rig.write_agent_config(spool_dir=disk.path))
            assert config.broker.port == rig.proxy.port != rig.broker.port
            assert [s.sensor_id for s in config.sensors] == [s.sensor_id for s in emulated.sensors]
            assert config.health.interval_s == 2.5
            assert config.broker.keepalive_s == 5  # the rig's own tuning stays
            assert config.spool.path == disk.path / "spool.sqlite" == rig.spool_path
            assert _mounted(disk.path) == (os.geteuid() == 0)

    asyncio.run(scenario())


def test_sensor_faults_act_on_the_ports_the_agent_opens(emulated: RigSpec, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Rig(emulated, tmp_path) as rig:
            air = rig.sensors["air_1"]
            path = str(air.table["port"])
            assert _pty_exists(path)
            rig.faults("air_1").unplug()
            assert not _pty_exists(path)  # the pty is gone: the host sees a hang-up
            rig.faults("air_1").replug()
            assert _pty_exists(path)  # a new pty behind the same name

            port = str(rig.sensors["bin_3"].table["port"])  # tcp://127.0.0.1:N
            address = ("127.0.0.1", int(port.rsplit(":", 1)[1]))
            rig.faults("bin_3").unplug()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=5).close()
            rig.faults("bin_3").replug()
            socket.create_connection(address, timeout=5).close()

            with pytest.raises(FaultUnsupported, match="tag_1: cannot inject noise"):
                rig.faults("tag_1").noise()

    asyncio.run(scenario())


def test_require_skips_with_the_reason_when_the_rig_cannot_inject(
    emulated: RigSpec, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Rig(emulated, tmp_path) as rig:
            rig.require("network")
            rig.require("unplug", sensor="meter_1")
            with pytest.raises(pytest.skip.Exception, match="BLE advertisement has no wire"):
                rig.require("bad_checksum", sensor="tag_1")

    asyncio.run(scenario())
    real = load_rig(RIGS / "example-real.toml")
    rig = Rig(real, tmp_path / "real")  # not entered: its hardware is not here
    rig.require("power")
    with pytest.raises(pytest.skip.Exception, match="bench-1 does not inject sensor faults"):
        rig.require("unplug", sensor="air_1")
