"""The real agent process, end to end: sensor -> spool -> signed MQTT -> verifier.

Power cuts are SIGKILLs of the agent process; the broker is a real mosquitto
that the tests stop and start. What the agent had committed is read from its
spool file right after each kill, then looked for at the verifier.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent.mqtt import Session, SessionSettings
from agent.tls import verifier_context
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import (
    AgentProcess,
    SpoolSnapshot,
    capture,
    citygate,
    new_capture,
    read_spool,
    write_config,
)

pytestmark = pytest.mark.integration


async def _until(predicate: object, limit_s: float, what: str) -> None:
    assert callable(predicate)
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


def test_agent_started_with_broker_down_spools_and_sends_when_it_returns(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])

    async def scenario() -> None:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        broker.stop()  # the verifier's session survives in the broker's persistence file
        with Pms5003Emulator(period_s=0.1, seed=3, wait_for_host=True) as sensor:
            config = write_config(tmp_path, lab, broker.port, {"air_1": sensor.port})
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            await _until(lambda: sensor.frames_sent >= 20, 20, "frames while the broker is down")
            broker.start()
            sensor.set_silent(True)
            await asyncio.sleep(0.5)  # the agent reads what is still in the pty
            produced = sensor.frames_sent * 3
            await _until(
                lambda: len(out.readings()) >= produced,
                20,
                f"all {produced} readings",
            )
            assert await agent.stop() == 0
            stop.set()
            await watcher
        assert len(out.readings()) == produced
        assert "retrying" in agent.output()
        summary = json.loads((tmp_path / "state" / "last-run.json").read_text())
        assert summary["accepted"] == produced
        assert (summary["spooled_readings"], summary["spooled_messages"]) == (0, 0)
        assert summary["published_messages"] == len(out.raw)

    asyncio.run(scenario())
    assert out.failures == []


def test_sigkill_while_broker_down_loses_nothing_the_spool_committed(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    out = new_capture(lab, ["gw-a"])
    spool_path = tmp_path / "state" / "spool.sqlite"
    snapshots: list[SpoolSnapshot] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        with Pms5003Emulator(period_s=0.05, seed=5, wait_for_host=True) as sensor:
            config = write_config(tmp_path, lab, broker.port, {"air_1": sensor.port})
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            await _until(lambda: len(out.messages) >= 3, 20, "first messages through the broker")
            broker.stop()
            for round_ in range(3):  # power cuts while the broker is unreachable
                target = 40 * (round_ + 2)
                await _until(lambda: sensor.frames_sent >= target, 20, "frames while offline")  # noqa: B023
                await agent.kill()
                snapshots.append(read_spool(spool_path))
                await agent.start()
            broker.start()
            await _until(
                lambda: (
                    all(s.readings <= out.readings() for s in snapshots)
                    and all((("gw-a", seq) in out.raw) for s in snapshots for seq in s.outbox)
                ),
                30,
                "every committed reading and message at the verifier",
            )
            assert await agent.stop() == 0
        stop.set()
        await watcher

    asyncio.run(scenario())
    assert out.failures == []
    assert any(s.outbox for s in snapshots), "the kills should have caught packed messages"
    for snapshot in snapshots:
        # committed readings all arrived ...
        assert snapshot.readings <= out.readings()
        # ... and packed messages were re-sent byte-identical to what was signed before the kill
        for seq, payload in snapshot.outbox.items():
            assert set(out.raw[("gw-a", seq)]) == {payload}
    # a seq is never used for two different messages, and new messages get new numbers
    for copies in out.raw.values():
        assert len(set(copies)) == 1
    seqs = [m.seq for m in out.messages]
    assert len(set(seqs)) == len({(m.seq, m.records) for m in out.messages})


def test_key_readable_by_others_refuses_to_start_with_the_fix(
    lab: LabFiles, tmp_path: Path
) -> None:
    _, key = lab.clients["gw-b"]
    loose = tmp_path / "loose.key"
    loose.write_bytes(key.read_bytes())
    os.chmod(loose, 0o644)
    config = write_config(tmp_path, lab, 1, {}, gateway="gw-b")
    config.write_text(config.read_text().replace(str(key), str(loose)))
    result = citygate("run", "--config", str(config))
    assert result.returncode == 1
    assert f"chmod 600 {loose}" in result.stderr
    assert not (tmp_path / "state" / "spool.sqlite").exists()


def test_malformed_config_is_refused_with_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nstate_dir = "/tmp/x"\n\n[broker]\nhost = "h"\nport = "eighty"\n')
    result = citygate("run", "--config", str(config))
    assert result.returncode == 1
    assert "gateway.toml:6: broker.port:" in result.stderr


def test_status_is_retained_online_and_the_will_says_offline_after_a_power_cut(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    cert, key = lab.clients["verifier"]
    settings = SessionSettings(
        "localhost", broker.port, "", verifier_context(cert, key, lab.ca_cert)
    )

    async def next_status(session: Session) -> dict[str, object]:
        async with asyncio.timeout(20):
            message = await anext(session.messages())
        assert message.topic == "citygate/gw-a/status"
        return dict(json.loads(message.payload))

    async def scenario() -> None:
        config = write_config(tmp_path, lab, broker.port, {})
        agent = AgentProcess(config, tmp_path / "agent.log")
        await agent.start()
        async with await Session.open(settings) as watcher:
            await watcher.subscribe("citygate/gw-a/status")
            status = await next_status(watcher)
            while status["state"] != "online":  # an older retained message may come first
                status = await next_status(watcher)
            assert status["gateway"] == "gw-a"
            await agent.kill()
            assert (await next_status(watcher))["state"] == "offline"
        # a late subscriber still learns the last state: it is retained
        async with await Session.open(settings) as late:
            await late.subscribe("citygate/gw-a/status")
            retained = await anext(late.messages())
            assert retained.retain
            assert json.loads(retained.payload)["state"] == "offline"

    asyncio.run(scenario())
