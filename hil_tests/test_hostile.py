"""Hostile input (guarantee 8): garbage on the sensor lines, on the command topics and in the
config file is refused with a clear word, costs bounded memory, and costs nothing else.

Serial lines. On every sensor whose line the rig can disturb, round after round
while the agent runs: random bytes (seeded random lengths), a frame with a wrong
checksum, a frame cut short, and random bytes again. After each burst every
disturbed sensor must deliver readings taken after it (two frames' worth: not
only a frame that was already on the wire). At the end the drivers must have
counted what they threw away in the signed health reports (a serial codec: a bad
frame per bad-checksum frame at least, and bad bytes; a Modbus RTU bus, once the
rig can put garbage on it: a spoilt reply per bad CRC), the agent must never have
exited, its resident memory must have stayed within `RSS_BOUND` of its steady
value, and a clean stop must find every accepted reading at the observer exactly
once. The sensors the rig cannot disturb are listed in the figures, with the
reason. (A line brings at most ~1 KB/s: this memory bound catches only gross
growth; the command topics below are where memory is really put to the test.)

Command topics. An operator identity, which the broker's ACL lets write every
gateway's command topics, sends the agent malformed commands (not JSON, not
UTF-8, NUL bytes, nesting deeper than a parser's stack, unknown commands and
keys, hostile topics), payloads just below and far above the agent's maximum
packet size, a flood (half of it nearly as big as the agent takes: megabytes
that would show in its memory if it kept them), and retained junk that the
broker hands the agent again at its next session (the link is reset to make
one). The agent must keep running and sending telemetry on one session per
reset (a hostile message never costs it its connection), keep its memory
bounded, obey a valid `cmd/health` after each flood (a health report arrives;
reports are otherwise hourly here), account for every message the broker passed
on (accepted + rejected + dropped, in last-run.json), and lose no reading. Its
`command_rejected` events come at most one per `agent.commands.REPORT_EVERY_S`,
one log line each, and together account for every rejection: the last one of a
burst is reported too, once its time has come.

Config files. A corpus of broken configs (truncated, wrong types, unknown keys,
huge values, control characters, binary garbage, deep nesting, a device, a
FIFO, a 2 GiB sparse file, thousands of broken sensors, ...) and seeded
hypothesis mutations of a valid config go to the real `citygate config check`
and `citygate run --config` (the short variant runs `run` on a sample of them):
each must exit 1 within `CLI_TIMEOUT_S` (a hang fails) in `CLI_MEMORY_BYTES` of
address space, print no traceback, and say what is wrong in at most
`MAX_SHOWN_ISSUES` + 1 lines of `FILE:LINE: KEY: MESSAGE`, none longer than
`MAX_LINE`. A mutation that is still a valid config must pass the check (and is
not run: it would start the service).

Trust: the rig, the operator and the corpus are test equipment; the agent is
observed from outside (broker, /proc, exit status, stderr, last-run.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands import MAX_COMMAND_BYTES, MAX_PACKET_SIZE, REPORT_EVERY_S
from agent.config import MAX_CONFIG_BYTES, MAX_SHOWN_ISSUES, ConfigError, load_config
from agent.mqtt import Session
from drivers.uart.device import PtyDevice
from hil_tests.delivery import latest_connects, stop_and_account
from hil_tests.observe import Observer, ProcessProbe, SignedPack, wait_until
from hil_tests.rig import Rig
from hil_tests.rigfile import RigSpec
from provisioning.pki import LabFiles, make_lab_pki

pytestmark = pytest.mark.integration

#: the agent's resident memory under attack, as a fraction of its steady value at most
RSS_BOUND = 1.2
#: how long the steady value is sampled, and how often memory is sampled
STEADY_S, SAMPLE_S = 1.0, 0.1
#: the longest burst of random bytes on a line (a 9600-baud line takes 0.27 s for it)
MAX_NOISE = 256
#: frames of a disturbed sensor, taken after a burst, that prove its line works again
FRAMES_AFTER_BURST = 2
#: a `citygate` command that has not exited by then hangs; it checks a config in far less
#: address space than this
CLI_TIMEOUT_S, CLI_MEMORY_BYTES = 30.0, 1 << 30
#: the longest line an error may print (a path, a key and a message of a few hundred characters)
MAX_LINE = 1000


@dataclass(frozen=True)
class Size:
    """How much hostility one variant brings."""

    rounds: int  # bursts on each serial line
    cycles: int  # command floods, each ended by a link reset
    flood: int  # hostile commands per flood
    retained: int  # retained junk commands per flood
    mutations: int  # hypothesis mutations of a valid config


SHORT = Size(rounds=3, cycles=1, flood=500, retained=60, mutations=20)
LONG = Size(rounds=60, cycles=6, flood=800, retained=500, mutations=300)
SIZES = [
    pytest.param(SHORT, id="short"),
    pytest.param(LONG, id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)]),
]


# -- memory --------------------------------------------------------------------------------


class MemoryWatch:
    """The agent's resident memory: its steady value, then the peak of a hostile phase."""

    def __init__(self, probe: ProcessProbe) -> None:
        self.probe = probe
        self.steady = 0
        self.peak = 0

    async def settle(self) -> None:
        """Sample for STEADY_S while nothing hostile happens; the largest sample is steady."""
        samples = []
        for _ in range(round(STEADY_S / SAMPLE_S)):
            samples.append(self.probe.sample().rss_bytes)
            await asyncio.sleep(SAMPLE_S)
        self.steady = max(samples)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Sample every SAMPLE_S while the block runs; the peak is kept."""

        async def sample() -> None:
            while True:
                self.peak = max(self.peak, self.probe.sample().rss_bytes)
                await asyncio.sleep(SAMPLE_S)

        task = asyncio.create_task(sample(), name="rss-sampler")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ProcessLookupError):
                await task

    def check(self) -> str:
        """Assert the bound; return the figures."""
        ratio = self.peak / self.steady
        figures = f"RSS steady {self.steady >> 10} KiB, peak {self.peak >> 10} KiB ({ratio:.2f}x)"
        assert ratio <= RSS_BOUND, f"memory grew under hostile input: {figures}"
        return figures


# -- serial lines -----------------------------------------------------------------------------


@dataclass
class Line:
    """One disturbed sensor line (a UART, or an RS-485 bus) and what was sent down it."""

    sensor: str
    noise_bytes: int = 0
    bad_checksums: int = 0
    truncated: int = 0


def _frames_since(observer: Observer, start: int, sensor: str, after: float) -> int:
    """Distinct times of `sensor`'s readings later than `after`, in telemetry arrived at index
    `start` or later: one per frame (the records of a frame share its time)."""
    times: set[float] = set()
    for arrival in observer.arrivals[start:]:
        if arrival.kind == "telemetry" and arrival.message is not None:
            times.update(r.t for r in arrival.message.records if r.sensor == sensor and r.t > after)
    return len(times)


async def _next_health(observer: Observer) -> SignedPack:
    """The first health report to arrive from now on."""
    start = len(observer.arrivals)

    def found() -> SignedPack | None:
        for arrival in observer.arrivals[start:]:
            if arrival.kind == "health" and arrival.message is not None:
                return SignedPack(arrival, arrival.message)
        return None

    await wait_until(lambda: found() is not None, timeout_s=15.0, what="a health report")
    pack = found()
    assert pack is not None
    return pack


def _counter(pack: SignedPack, sensor: str, name: str) -> int:
    value = pack.value(sensor, name)
    assert isinstance(value, int | float), (sensor, name, value)
    assert not isinstance(value, bool), (sensor, name, value)
    return int(value)


#: where a Modbus driver owns up to garbage on its line: a reply spoilt by noise or a bad CRC
#: is one that never came (pymodbus drops it), or one that came wrong
_MODBUS_BAD = ("timeouts", "bad_replies")


def _check_counted(lines: Sequence[Line], before: SignedPack, after: SignedPack) -> None:
    """Every serial driver counted each bad-checksum frame sent to it as a bad frame, and
    some bad bytes; the Modbus sensors together (a bad CRC spoils the next reply on the bus,
    whoever's it is) counted at least as many spoilt replies as bad CRCs were sent."""
    modbus_sent = modbus_counted = 0
    for line in lines:
        sid = line.sensor

        def grown(name: str, sid: str = sid) -> int:
            return _counter(after, sid, name) - _counter(before, sid, name)

        if after.value(sid, "bad_frames") is None:  # not a serial codec: a Modbus bus
            spoilt = sum(grown(name) for name in _MODBUS_BAD)
            modbus_sent += line.bad_checksums
            modbus_counted += spoilt
            counted = f"{spoilt} spoilt replies"
        else:
            assert grown("bad_frames") >= max(line.bad_checksums, 1), (sid, line)
            assert grown("bad_bytes") >= 1, (sid, line)
            counted = f"{grown('bad_frames')} bad frames and {grown('bad_bytes')} bad bytes"
        print(
            f"{sid}: sent {line.noise_bytes} noise bytes, {line.bad_checksums} bad checksums, "
            f"{line.truncated} truncated frames; the driver counted {counted}"
        )
        assert after.value(sid, "available") is True, after.subjects()[sid]
    assert modbus_counted >= modbus_sent, (modbus_counted, modbus_sent)


def _burst(rig: Rig, line: Line, rng: random.Random) -> None:
    """Random bytes, a bad-checksum frame, a frame cut short, random bytes."""
    faults = rig.faults(line.sensor)
    emulator = rig.sensors[line.sensor].emulator
    for step in ("noise", "bad_checksum", "truncated", "noise"):
        if step == "noise":
            n = rng.randrange(1, MAX_NOISE + 1)
            faults.noise(n)
            line.noise_bytes += n
        elif step == "bad_checksum" and faults.supports("bad_checksum"):
            faults.bad_checksum()
            line.bad_checksums += 1
        elif step == "truncated" and isinstance(emulator, PtyDevice):
            # SensorFaults has no name for a truncated frame: the pty emulator's own fault
            emulator.inject_truncated()
            line.truncated += 1


@pytest.mark.parametrize("size", SIZES)
def test_garbage_on_every_sensor_line_is_counted_and_costs_no_reading_and_no_memory(
    rig_spec: RigSpec, tmp_path: Path, size: Size
) -> None:
    rng = random.Random(8)

    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path) as rig:
            rig.require("noise")
            lines = [Line(s) for s in rig.sensors if rig.faults(s).supports("noise")]
            untouched = {
                s: rig.faults(s).why_not("noise")
                for s in rig.sensors
                if not rig.faults(s).supports("noise")
            }
            if not lines:
                pytest.skip(f"no sensor of rig {rig_spec.name} takes noise: {untouched}")
            observer = rig.observer
            await rig.start_agent()
            memory = MemoryWatch(rig.probe())
            await wait_until(
                lambda: set(observer.readings_by_sensor()) >= set(rig.sensors),
                timeout_s=rig_spec.first_reading_s,
                what=f"readings of every sensor (so far {dict(observer.readings_by_sensor())})",
            )
            await memory.settle()
            before = await _next_health(observer)
            async with memory.watching():
                for _ in range(size.rounds):
                    start, burst_at = len(observer.arrivals), time.time()
                    for line in lines:
                        _burst(rig, line, rng)

                    def caught_up(start: int = start, burst_at: float = burst_at) -> bool:
                        return all(
                            _frames_since(observer, start, line.sensor, burst_at)
                            >= FRAMES_AFTER_BURST
                            for line in lines
                        )

                    await wait_until(
                        caught_up,
                        timeout_s=15.0,
                        what=f"{FRAMES_AFTER_BURST} frames of every disturbed sensor after a burst",
                    )
                    assert rig.agent_running, rig.agent_log()[-4000:]
            after = await _next_health(observer)
            _check_counted(lines, before, after)
            print(f"not disturbed: {untouched}; {memory.check()}")
            await stop_and_account(rig)

    asyncio.run(scenario())


# -- command topics --------------------------------------------------------------------------


@pytest.fixture
def operator() -> str:
    """The identity that sends commands: the rig's operator (the broker lets it write cmd/#)."""
    return Rig.operator


@contextlib.asynccontextmanager
async def _operator_session(rig: Rig, name: str) -> AsyncIterator[Session]:
    """The operator on the broker directly (the cloud side is not behind the gateway's link)."""
    cert, key = rig.lab.clients[name]
    settings = rig.broker.session_settings(cert, key, rig.lab.ca_cert, client_id=name)
    async with await Session.open(settings) as session:
        yield session


@dataclass
class Operator:
    """Sends to the gateway's topics and counts what the broker must pass on to the agent:
    everything that fits in the agent's maximum packet size (sizes are chosen far from it)."""

    session: Session
    base: str
    sent: int = 0
    deliverable: int = 0

    async def send(self, tail: str, payload: bytes, *, retain: bool = False) -> None:
        topic = f"{self.base}/{tail}"
        await self.session.publish(topic, payload, retain=retain)
        self.sent += 1
        if len(payload) + len(topic.encode()) < MAX_PACKET_SIZE - 16:
            self.deliverable += 1


#: one of each: the first few reach the parser, the rest meet the rate limit
MALFORMED: list[tuple[str, bytes]] = [
    ("cmd/health", b"{}" + b" " * (MAX_PACKET_SIZE - 200)),  # just below the packet limit
    ("cmd/health", b"[" * (MAX_COMMAND_BYTES - 8)),  # deeper than the JSON parser's stack
    ("cmd/health", b"\xff\xfe{}"),
    ("cmd/health", b"{}\x00"),
    ("ota/offer", b'{"version": "1.0", "version": "../../9.9"}'),
    ("cmd/health", b"{}" + b" " * (MAX_PACKET_SIZE + 1)),  # never passed on
    ("cmd/health", b"\x00" * (4 * MAX_PACKET_SIZE)),  # never passed on
    ("cmd/health", b'{"a":' * 500 + b"0" + b"}" * 500),
    ("cmd/health", b"\xed\xa0\x80"),
    ("cmd/reboot", b"{}"),
    ("cmd/" + "x" * 30_000, b"{}"),
    ("cmd/health/\u2028\u00e9", b"{}"),
    ("cmd/health", b'{"now": true}'),
    ("cmd/health", b"[]"),
    ("ota/offer", b'{"version": 1e999}'),
    ("ota/offer", b'{"version": "1.0", "url": "http://example.com/x"}'),
    ("ota/offer", b"{}"),
]


def _hostile(rng: random.Random) -> tuple[str, bytes]:
    """One flood message: a topic tail and payload no gateway may accept. Half of them are
    nearly as big as the agent takes: kept, they would show in its memory."""
    size = rng.randrange(1, 6000)
    word = "".join(rng.choices("abcdefghij/é", k=rng.randrange(1, 12)))
    match rng.randrange(10):
        case 0:
            return "cmd/health", b"\xff" + rng.randbytes(size)
        case 1:
            return f"cmd/x{word}", b"{}"
        case 2:
            version = rng.choice([1, None, "latest", [1], {"a": 1}, "1." * 40])
            return "ota/offer", json.dumps({"version": version}).encode()
        case 3:
            return "cmd/health", json.dumps({word: rng.random()}).encode()
        case 4:
            return "cmd/health", b"{" * size
        case _:
            return "cmd/health", b"{}" + b" " * (MAX_PACKET_SIZE - 200 - size)


async def _health_on_request(rig: Rig, operator: Operator) -> SignedPack:
    """Send `cmd/health` until a health report answers (the rate limit may refuse the first
    ones after a flood); the report must not open a session (it was asked for)."""
    observer = rig.observer
    connects = latest_connects(observer)
    for _ in range(10):
        start = len(observer.arrivals)
        await operator.send("cmd/health", b"{}")

        def answered(start: int = start) -> SignedPack | None:
            for arrival in observer.arrivals[start:]:
                if arrival.kind == "health" and arrival.message is not None:
                    return SignedPack(arrival, arrival.message)
            return None

        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: answered() is not None,
                timeout_s=2.0 * REPORT_EVERY_S,
                what="a health report on request",
            )
        pack = answered()
        if pack is not None:
            assert pack.value("agent", "connects") == connects, "a new session, not an answer"
            return pack
    raise AssertionError("no health report answered ten cmd/health requests")


@dataclass(frozen=True)
class Rejection:
    """One `command_rejected` event as the observer verified it."""

    time: float
    topic: str
    fields: Mapping[str, float | str | bool]

    @property
    def not_reported(self) -> int:
        return int(float(self.fields["not_reported"]))  # float() also reads it sent as text


def _rejections(observer: Observer) -> list[Rejection]:
    """The verified `command_rejected` events, each once (a copy re-sent after a lost
    acknowledgement has the same seq)."""
    found: dict[int, Rejection] = {}
    for pack in observer.events():
        group = pack.subjects().get("commands", {})
        if group.get("event") == "command_rejected":
            when = min(r.t for r in pack.records if r.sensor == "commands")
            found.setdefault(pack.message.seq, Rejection(when, str(group.get("topic")), group))
    return list(found.values())


async def _hostile_cycle(rig: Rig, operator: Operator, rng: random.Random, size: Size) -> None:
    """Malformed commands, a flood and retained junk; a valid command; a link reset."""
    for tail, payload in MALFORMED:
        await operator.send(tail, payload)
    flood = [_hostile(rng) for _ in range(size.flood)]
    await asyncio.gather(*(operator.send(tail, payload) for tail, payload in flood))
    for i in range(size.retained):
        await operator.send(f"cmd/junk/{i}", rng.randbytes(rng.randrange(1, 200)), retain=True)
    # a retained command is refused when the broker hands it over again (and this one is
    # refused the first time too, so that it cannot answer the request below)
    await operator.send("cmd/health", b'{"reboot": true}', retain=True)
    await _health_on_request(rig, operator)  # every message before it was handled
    assert rig.agent_running, rig.agent_log()[-4000:]
    connects = latest_connects(rig.observer)
    readings = rig.observer.readings_total()
    rig.proxy.reset()  # the next session: the broker hands over the retained junk at once
    operator.deliverable += size.retained + 1
    await wait_until(
        lambda: (
            latest_connects(rig.observer) == connects + 1
            and rig.observer.readings_total() > readings
        ),
        timeout_s=15.0,
        what="the agent back on a new session, sending telemetry",
    )
    await _health_on_request(rig, operator)  # the retained junk was handled too


async def _last_of_a_burst_reported(rig: Rig, operator: Operator) -> None:
    """Two unknown commands back to back: the throttle holds the second back, and it must
    still be reported once its time has come (the last word on a burst is not lost)."""
    await operator.send("cmd/last-1", b"{}")
    await operator.send("cmd/last-2", b"{}")
    await wait_until(
        lambda: any(r.topic.endswith("/cmd/last-2") for r in _rejections(rig.observer)),
        timeout_s=5.0 * REPORT_EVERY_S,
        what="the report of the last rejection of a burst",
    )


@pytest.mark.parametrize("size", SIZES)
def test_hostile_commands_are_rejected_and_reported_and_the_agent_keeps_working(
    rig_spec: RigSpec, tmp_path: Path, operator: str, size: Size
) -> None:
    rng = random.Random(8)

    async def scenario() -> None:
        async with Rig(rig_spec, tmp_path, tuning={"health": {"interval_s": 3600.0}}) as rig:
            rig.require("network")  # the link reset that makes the broker resend retained junk
            observer = rig.observer
            await rig.start_agent()
            memory = MemoryWatch(rig.probe())
            async with _operator_session(rig, operator) as session:
                sender = Operator(session, f"{observer.prefix}/{rig.gateway}")
                await wait_until(
                    lambda: set(observer.readings_by_sensor()) >= set(rig.sensors),
                    timeout_s=rig_spec.first_reading_s,
                    what="readings of every sensor",
                )
                await _health_on_request(rig, sender)  # subscribed, and obeys
                await memory.settle()
                async with memory.watching():
                    for _ in range(size.cycles):
                        await _hostile_cycle(rig, sender, rng, size)
                    await _last_of_a_burst_reported(rig, sender)
            assert latest_connects(observer) == 1 + size.cycles
            summary = await stop_and_account(rig)
            counts = {
                k: int(str(summary[f"commands_{k}"])) for k in ("accepted", "rejected", "dropped")
            }
            rejections = _rejections(observer)
            print(
                f"sent {sender.sent} messages, {sender.deliverable} passed on to the agent "
                f"(with retained copies); the agent counted {counts}; "
                f"{len(rejections)} command_rejected events; {memory.check()}"
            )
            assert sum(counts.values()) == sender.deliverable, "a message is not accounted for"
            _check_rejections(rejections, counts["rejected"], rig.agent_log())
            assert all(
                _is_number(r.fields[k]) for r in rejections for k in ("size", "not_reported")
            ), "command_rejected sends its counts as numbers"

    asyncio.run(scenario())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_rejections(rejections: list[Rejection], rejected: int, log: str) -> None:
    """Reported at most once per REPORT_EVERY_S, and together accounting for every rejection
    (each report stands for itself and the ones it says it left out)."""
    assert rejections, "no command_rejected event"
    times = sorted(r.time for r in rejections)
    periods = (times[-1] - times[0]) / REPORT_EVERY_S
    assert len(rejections) <= periods + 2, f"{len(rejections)} reports in {periods:g} periods"
    assert sum(1 + r.not_reported for r in rejections) == rejected
    assert log.count("command rejected on ") == len(rejections), "one log line per report"
    assert "Traceback" not in log


# -- config files ----------------------------------------------------------------------------

_ISSUE = re.compile(r"(?P<file>.+?):(?P<line>\d+): (?P<key>\S.*?): (?P<message>\S.*)")
_SAMPLE = Path(__file__).resolve().parents[1] / "docs" / "sample-gateway.toml"
_DRIVERS = Path(__file__).resolve().parents[1] / "drivers"


def _valid_config(lab: LabFiles, workdir: Path) -> str:
    """The shipped sample plus every driver's sample block (but the sample's own PMS5003),
    with the lab's identity files and a port of its own for each sensor outside /dev."""
    cert, key = lab.clients["gw-a"]
    text = _SAMPLE.read_text()
    for name, path in (("key", key), ("cert", cert), ("ca", lab.ca_cert)):
        line = re.compile(rf'^{name} = ".*"$', re.MULTILINE)
        text = line.sub(f"{name} = {json.dumps(str(path))}", text, count=1)
    text = text.replace('"/var/lib/citygate"', json.dumps(str(workdir / "state")))
    blocks = [
        p.read_text() for p in sorted(_DRIVERS.glob("*/sample.toml")) if "pms5003" not in str(p)
    ]
    text = "\n".join([text, *blocks])
    ports = iter(range(1000))
    return re.sub(r'"/dev/tty\w+"', lambda _: json.dumps(str(workdir / f"tty{next(ports)}")), text)


def _corpus(valid: str, workdir: Path) -> dict[str, Path]:
    """Broken configs by name; each a path to hand to the command line."""
    rng = random.Random(8)
    files: dict[str, bytes] = {
        "empty": b"",
        "truncated in a string": valid[: valid.index('"mqtt.example.city"') + 6].encode(),
        "truncated in a header": valid[: valid.index("[spool]") + 3].encode(),
        "truncated in a table": valid[: valid.index("cert = ")].encode(),
        "wrong types": valid.replace("port = 8883", 'port = "8883"')
        .replace("tls = true", 'tls = "yes"')
        .replace("keepalive_s = 30", "keepalive_s = 1.5")
        .encode(),
        "unknown keys": (
            valid + '\n[nonsense]\ncolour = 1\n[sensors.x1]\ndriver = "ruuvi"\n'
            'address = "AA:BB:CC:DD:EE:01"\nfrobnicate = true\n'
        ).encode(),
        "huge values": valid.replace("port = 8883", f"port = {10**4000}")
        .replace("budget_bytes = 67108864", "budget_bytes = 1e400")
        .replace('"mqtt.example.city"', json.dumps("h" * 200_000))
        .encode(),
        "a number of 5000 digits": valid.replace(
            "inflight = 16", "inflight = " + "9" * 5000
        ).encode(),
        "control characters in values": (
            valid.replace('"mqtt.example.city"', r'"mqtt\n\u001b[2J.example.city"')
            + '[sensors.evil]\ndriver = "pms5003"\nport = "/dev/tty\\n\\u001b[2J\\u2028x"\n'
        ).encode(),
        "binary garbage": rng.randbytes(4096),
        "NUL bytes": valid.encode().replace(b"[broker]", b"[bro\x00ker]"),
        "UTF-16": valid.encode("utf-16"),
        "nested arrays": b"x = " + b"[" * 100_000,
        "nested tables": b"x = " + b"{a = " * 5_000 + b"1" + b"}" * 5_000,
        "thousands of broken sensors": "".join(  # just below MAX_CONFIG_BYTES
            f'[sensors.s{i}]\ndriver="x"\nport="/dev/n{i}"\n' for i in range(22_500)
        ).encode(),
    }
    paths = {}
    for index, (name, data) in enumerate(files.items()):
        path = workdir / f"case-{index}.toml"
        path.write_bytes(data)
        paths[name] = path
    paths["too big"] = workdir / "disk-image.toml"
    with paths["too big"].open("wb") as image:  # sparse: a 2 GiB file that takes no space
        image.truncate(2 << 30)
    fifo = workdir / "fifo.toml"
    os.mkfifo(fifo)
    paths |= {"a FIFO": fifo, "a device": Path("/dev/zero"), "a directory": workdir}
    paths["missing"] = workdir / "missing.toml"
    return paths


@dataclass(frozen=True)
class Outcome:
    command: str
    returncode: int
    stderr: str


async def _citygate(*args: str) -> Outcome:
    """The command line as a user runs it, in at most CLI_MEMORY_BYTES of address space (a
    runaway read fails there, not on the machine); no exit within CLI_TIMEOUT_S is a hang."""
    proc = await asyncio.create_subprocess_exec(
        "prlimit", f"--as={CLI_MEMORY_BYTES}", sys.executable, "-m", "agent.cli", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            _, err = await proc.communicate()
    except TimeoutError:
        raise AssertionError(f"`citygate {' '.join(args)}` hung for {CLI_TIMEOUT_S:g} s") from None
    finally:
        if proc.returncode is None:  # timed out, or the test is failing elsewhere
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Outcome(" ".join(args), proc.returncode, err.decode(errors="replace"))


def _check_refusal(outcome: Outcome, path: Path) -> None:
    """Exit 1, no traceback, every line a FILE:LINE: KEY: MESSAGE about this file."""
    what = f"`citygate {outcome.command}`:\n{outcome.stderr[-3000:]}"
    assert outcome.returncode == 1, what
    assert "Traceback" not in outcome.stderr, what
    lines = outcome.stderr.splitlines()
    assert 0 < len(lines) <= MAX_SHOWN_ISSUES + 1, what  # the rest are counted in the last
    last_line = 0
    if path.is_file():
        with path.open("rb") as file:  # no more of it than the agent reads
            last_line = file.read(MAX_CONFIG_BYTES).count(b"\n") + 1
    for line in lines:
        issue = _ISSUE.fullmatch(line)
        assert issue is not None, f"not FILE:LINE: KEY: MESSAGE: {line!r} in {what}"
        assert len(line) <= MAX_LINE, f"a line of {len(line)} characters in {what}"
        assert issue["file"] == str(path), what
        assert 0 <= int(issue["line"]) <= last_line, what


def _invalid_for_run(path: Path) -> bool:
    """Whether `citygate run` must refuse the file (its check of the config alone)."""
    try:
        load_config(path)
    except ConfigError:
        return True
    return False


async def _judge(path: Path, limit: asyncio.Semaphore, *, run: bool) -> bool:
    """Run `config check` on `path` (and with `run`, `citygate run` too, if the config is
    invalid); False when the file is a valid config after all (the check passed)."""
    async with limit:
        checked = await _citygate("config", "check", str(path))
    if checked.returncode == 0 and path.is_file():
        assert not _invalid_for_run(path), f"config check passed a config run refuses: {path}"
        return False
    _check_refusal(checked, path)
    if run and not (path.is_file() and not _invalid_for_run(path)):  # else run would start
        async with limit:
            _check_refusal(await _citygate("run", "--config", str(path)), path)
    return True


async def _judge_all(paths: Mapping[Path, bool]) -> list[bool]:
    """`_judge` every path (with `run` as mapped), as many at once as there are cores."""
    limit = asyncio.Semaphore(os.cpu_count() or 2)
    return await asyncio.gather(*(_judge(path, limit, run=run) for path, run in paths.items()))


#: the broken configs that `citygate run` gets too in the short variant (all of them in the
#: long one): one of each way of failing (the file, its bytes, its TOML, its values)
_RUN_SHORT = frozenset(
    {"a FIFO", "too big", "binary garbage", "nested arrays", "huge values", "unknown keys"}
)
#: broken configs only the long variant checks: a way of failing that another one shows
_LONG_ONLY = frozenset(
    {"truncated in a header", "truncated in a table", "NUL bytes", "nested tables"}
    | {"a directory", "missing"}
)


@pytest.mark.parametrize("size", SIZES)
def test_the_valid_base_config_passes_and_every_broken_one_is_refused_clearly(
    tmp_path: Path, size: Size
) -> None:
    lab = make_lab_pki(tmp_path / "pki", clients=["gw-a"])
    valid = tmp_path / "valid.toml"
    valid.write_text(_valid_config(lab, tmp_path))
    corpus = {
        name: path
        for name, path in _corpus(valid.read_text(), tmp_path).items()
        if size is LONG or name not in _LONG_ONLY
    }
    runs = {valid: False} | {
        path: size is LONG or name in _RUN_SHORT for name, path in corpus.items()
    }
    judged = asyncio.run(_judge_all(runs))
    assert judged[0] is False, "the valid base config was refused"
    accepted = [name for name, refused in zip(corpus, judged[1:], strict=True) if not refused]
    assert accepted == [], f"broken configs passed the check: {accepted}"


def _toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


#: a TOML value of any type, some of them absurd
_VALUES = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats().map(_toml_float),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=40).map(json.dumps),
    st.sampled_from(["[]", "{}", '[[1], ["a"]]', "{ a = { b = 1 } }", "1979-05-27T07:32:00Z"]),
    st.sampled_from(['"/dev/null"', "'lit'", '"""two\nlines"""', '"/dev/tty-nope"', '"."']),
    st.integers(4000, 5000).map(lambda digits: "9" * digits),  # beyond int()'s 4300 digits
    st.text(max_size=20).map(lambda text: json.dumps(f"/dev/{text}")),  # control characters
    st.integers(1000, 100_000).map(lambda length: json.dumps("x" * length)),
)


def _statements(text: str) -> list[str]:
    """The key/value and header lines of a TOML text: where an edit changes something."""
    return [
        line
        for line in text.splitlines(keepends=True)
        if line.strip() and not line.lstrip().startswith("#")
    ]


@st.composite
def _mutated(draw: st.DrawFn, statements: list[str]) -> bytes:
    """A config of `statements` with one to three of them edited, then maybe cut short or
    with random bytes spliced in."""
    lines = list(statements)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        match draw(st.sampled_from(["value", "delete", "duplicate", "key", "header", "swap"])):
            case "value" if "=" in line:
                lines[i] = f"{line.split('=', 1)[0]}= {draw(_VALUES)}\n"
            case "delete":
                lines[i] = ""
            case "duplicate":
                lines[i] = line + line
            case "key" if "=" in line:
                key = draw(st.text(alphabet="abcxyz_-.\"' ", min_size=1, max_size=12))
                lines[i] = f"{key} = {line.split('=', 1)[1]}"
            case "header":
                lines[i] = f"[{draw(st.text(alphabet='abcsensors._ ', max_size=16))}]\n"
            case _:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
    data = "".join(lines).encode("utf-8", "surrogatepass")
    match draw(st.sampled_from(["whole", "whole", "whole", "cut", "splice"])):
        case "cut":
            data = data[: draw(st.integers(0, len(data)))]
        case "splice":
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    return data


@pytest.mark.parametrize("size", SIZES)
def test_mutations_of_a_valid_config_are_refused_clearly_or_pass(
    tmp_path: Path, size: Size
) -> None:
    lab = make_lab_pki(tmp_path / "pki", clients=["gw-a"])
    statements = _statements(_valid_config(lab, tmp_path))
    unmutated = tmp_path / "statements.toml"
    unmutated.write_text("".join(statements))
    load_config(unmutated, check_devices=True)  # the mutations start from a valid config
    files: dict[bytes, Path] = {}

    @settings(
        max_examples=size.mutations,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=_mutated(statements))
    def collect(data: bytes) -> None:
        if data not in files:
            files[data] = tmp_path / f"mutation-{len(files)}.toml"
            files[data].write_bytes(data)

    collect()
    # `citygate run` on every fourth in the short variant (it reads the config as the check
    # does), on all of them in the long one
    judged = asyncio.run(
        _judge_all({path: size is LONG or i % 4 == 0 for i, path in enumerate(files.values())})
    )
    print(f"{len(files)} mutations: {judged.count(True)} refused, {judged.count(False)} valid")
