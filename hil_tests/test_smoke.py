"""The smoke scenario: the rig's agent runs for a while, stops cleanly, and lost nothing.

Every sensor of the rig must deliver verified readings in several messages
(the agent keeps reading and sending, not just a first batch), the probe must
see the agent process, and at the clean stop every reading the agent accepted
(its last-run.json) must have reached the observer exactly once; no message
may fail verification, and a message received twice must be byte-identical.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hil_tests.observe import wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec

pytestmark = pytest.mark.integration

#: distinct telemetry messages that must carry each sensor's readings: a few seconds of
#: running, or with --long some minutes
SHORT, LONG = 3, 300


@pytest.mark.parametrize(
    "messages", [SHORT, pytest.param(LONG, marks=[pytest.mark.long, pytest.mark.timeout(1800)])]
)
def test_every_sensor_delivers_verified_readings_and_a_clean_stop_loses_nothing(
    rig_spec: RigSpec, tmp_path: Path, messages: int
) -> None:
    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            await rig.start_agent()
            probe = rig.probe()

            def messages_per_sensor() -> dict[str, int]:
                found = dict.fromkeys(rig.sensors, 0)
                for message in rig.observer.telemetry().values():
                    for sensor in {r.sensor for r in message.records} & found.keys():
                        found[sensor] += 1
                return found

            await wait_until(
                lambda: min(messages_per_sensor().values()) >= messages,
                timeout_s=rig_spec.first_reading_s + 5.0 * messages,
                what=f"readings of every sensor in {messages} messages "
                f"(so far {messages_per_sensor()})",
            )
            sample = probe.sample()
            assert sample.rss_bytes > 0
            assert sample.cpu_s > 0

            run = await rig.stop_agent()
            assert run.returncode == 0, rig.agent_log()
            assert run.summary is not None, "a clean stop writes last-run.json"
            accepted = run.summary["accepted"]
            assert isinstance(accepted, int)
            observer = rig.observer
            await wait_until(
                lambda: observer.readings_total() >= accepted,
                timeout_s=10.0,
                what=f"all {accepted} accepted readings at the observer",
            )
            assert observer.readings_total() == accepted
            assert (run.summary["spooled_readings"], run.summary["spooled_messages"]) == (0, 0)
            assert observer.failures == []
            assert observer.differing_duplicates() == []
            assert not observer.repeated_readings()
            statuses = [s.get("state") for s in observer.statuses()]
            assert statuses[-1:] == ["offline"], statuses

    asyncio.run(scenario())
