"""Plaintext MQTT is refused unless a development flag asks for it, and then it is loud."""

from __future__ import annotations

import asyncio
import getpass
import subprocess
from pathlib import Path

import pytest

from agent.mqtt import ConnectFailed, Session, SessionSettings
from provisioning.broker import find_mosquitto, free_port
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, citygate, write_config

pytestmark = pytest.mark.integration


def _plaintext_config(tmp_path: Path, lab: LabFiles, port: int) -> Path:
    config = write_config(tmp_path, lab, port, {})
    text = config.read_text().replace("[broker]\n", "[broker]\ntls = false\n")
    config.write_text(text)
    return config


def test_plaintext_config_is_refused_without_the_development_flag(
    lab: LabFiles, tmp_path: Path
) -> None:
    config = _plaintext_config(tmp_path, lab, 1883)
    result = citygate("run", "--config", str(config))
    assert result.returncode == 1
    assert "--insecure-plaintext-for-development" in result.stderr
    assert "refused" in result.stderr
    checked = citygate("config", "check", str(config))
    assert "warning: broker.tls = false" in checked.stderr


def test_development_flag_allows_plaintext_and_says_so_loudly(
    lab: LabFiles, tmp_path: Path
) -> None:
    port = free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {getpass.getuser()}\n"
    )
    broker = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    config = _plaintext_config(tmp_path, lab, port)

    async def scenario() -> bytes:
        settings = SessionSettings("127.0.0.1", port, "watcher", None, connect_timeout_s=2.0)
        for _ in range(50):  # until mosquitto listens
            try:
                watcher = await Session.open(settings)
                break
            except ConnectFailed:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("plaintext broker did not start")
        async with watcher:
            await watcher.subscribe("citygate/gw-a/status")
            agent = AgentProcess(
                config, tmp_path / "agent.log", args=["--insecure-plaintext-for-development"]
            )
            await agent.start()
            try:
                async with asyncio.timeout(20):
                    message = await anext(watcher.messages())
            finally:
                assert await agent.stop() == 0
        return message.payload

    try:
        status = asyncio.run(scenario())
    finally:
        broker.terminate()
        broker.wait()
    assert b'"state":"online"' in status
    log = (tmp_path / "agent.log").read_text()
    assert "ERROR agent.service: INSECURE: plaintext MQTT" in log
    assert "INSECURE: this MQTT session is plaintext" in log
