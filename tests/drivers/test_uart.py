"""The shared serial layer: paced pty emulator, port owner, hang-up versus spurious wake.

Timing assertions are lower bounds only ("not faster than the wire allows"),
computed from the baud rate in the test, with generous tolerance.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import serial

from drivers import Decoded, OptionError, Reading
from drivers.uart import (
    BaseProtocol,
    PtyDevice,
    SerialDriver,
    SerialLink,
    SerialSettings,
    next_backoff,
    options,
    wire_time_s,
)
from drivers.uart.device import BURST_S, CATCH_UP_S
from drivers.uart.host import BACKOFF_MAX_S, hung_up

POLL_S = 0.01


class CountingDevice(PtyDevice):
    """Sends `frame_len`-byte frames "#<counter>...\\n"; echoes "?" with an answer frame."""

    name = "counting"

    def __init__(self, *, frame_len: int = 16, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.frame_len = frame_len
        self.count = 0
        self.questions = 0

    def _frame(self) -> bytes:
        self.count += 1
        body = f"#{self.count}".encode()
        return body + b"." * (self.frame_len - len(body) - 1) + b"\n"

    def next_frame(self) -> bytes:
        return self._frame()

    def bad_frame(self) -> bytes:
        return b"#x\n"

    def on_input(self, data: bytes) -> None:
        for _ in range(data.count(b"?")):
            self.questions += 1
            self.send(self._frame())


class LineProtocol(BaseProtocol):
    """Host side of CountingDevice: one reading per line, calls recorded."""

    def __init__(self, poll_delay: float | None = None) -> None:
        self.calls: list[str] = []
        self.buf = b""
        self.lines = 0
        self.poll_delay = poll_delay

    def connected(self, link: SerialLink) -> None:
        self.calls.append("connected")
        self.buf = b""

    def data_received(self, data: bytes, now: float) -> list[Decoded]:
        self.buf += data
        out: list[Decoded] = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.startswith(b"#") and line[1:].rstrip(b".").isdigit():
                self.lines += 1
                out.append(Decoded([("count", "/", float(line[1:].rstrip(b".")))]))
        return out

    def poll(self, link: SerialLink) -> float | None:
        self.calls.append("poll")
        link.write(b"?")
        return self.poll_delay

    def disconnected(self) -> None:
        self.calls.append("disconnected")

    def counters(self) -> Mapping[str, int]:
        return {"lines": self.lines}


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)

    def values(self) -> list[int]:
        return [int(r.value) for r in self.readings]


@contextlib.contextmanager
def raw_reader(port: str) -> Iterator[int]:
    fd = os.open(port, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        yield fd
    finally:
        os.close(fd)


def read_until(fd: int, n_bytes: int, timeout_s: float = 20.0) -> list[tuple[float, int]]:
    """Read until `n_bytes` arrived; return (monotonic time, bytes) per read."""
    got: list[tuple[float, int]] = []
    total = 0
    deadline = time.monotonic() + timeout_s
    while total < n_bytes:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {total} of {n_bytes} bytes arrived")
        select.select([fd], [], [], 0.05)
        with contextlib.suppress(BlockingIOError):
            chunk = os.read(fd, 4096)
            if chunk:
                got.append((time.monotonic(), len(chunk)))
                total += len(chunk)
    return got


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- pure parts ----------------------------------------------------------------------------


def test_wire_time_counts_ten_bits_per_byte() -> None:
    assert wire_time_s(960, 9600) == pytest.approx(1.0)
    assert wire_time_s(32, 9600) == pytest.approx(0.0333, abs=1e-4)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert next_backoff(0.5) == 1.0
    assert next_backoff(BACKOFF_MAX_S) == BACKOFF_MAX_S


@pytest.mark.parametrize(
    ("check", "key"),
    [
        (options.port, "port"),
        (lambda t: options.baud(t, 9600), "baud"),
        (lambda t: options.seconds(t, "poll_interval_s", 1.0, 0.1, 10), "poll_interval_s"),
        (lambda t: options.choice(t, "model", "a", ("a", "b")), "model"),
        (lambda t: options.flag(t, "sleepy", False), "sleepy"),
        (
            lambda t: options.reject_unknown(
                "fam", "s1", t, ("baud", "poll_interval_s", "model", "sleepy")
            ),
            "colour",
        ),
    ],
)
def test_option_helpers_name_the_key(
    check: Callable[[dict[str, object]], object], key: str
) -> None:
    bad = {"baud": 9601, "poll_interval_s": 0, "model": "c", "sleepy": "yes", "colour": 1}
    with pytest.raises(OptionError) as info:
        check(bad)
    assert info.value.key == key


def test_option_helpers_accept_good_values() -> None:
    table = {"driver": "x", "port": "/dev/ttyS0", "baud": 115200, "t": 2, "m": "b", "f": True}
    options.reject_unknown("fam", "s1", table, ("port", "baud", "t", "m", "f"))
    assert options.port(table) == "/dev/ttyS0"
    assert options.baud(table, 9600) == 115200
    assert options.seconds(table, "t", 1.0, 0, 5) == 2.0
    assert options.choice(table, "m", "a", ("a", "b")) == "b"
    assert options.flag(table, "f", False) is True
    assert options.seconds({}, "t", 1.5, 0, 5) == 1.5


# -- device side: pacing ----------------------------------------------------------------------


@pytest.mark.integration
def test_output_is_never_faster_than_the_wire_allows() -> None:
    baud, n_bytes = 19200, 1200  # 0.625 s of wire time
    burst = max(1, round(BURST_S / wire_time_s(1, baud)))
    with (
        CountingDevice(baud=baud, period_s=0.001, frame_len=40) as device,
        raw_reader(device.port) as fd,
    ):
        reads = read_until(fd, n_bytes)
    first_time, first_len = reads[0]
    elapsed = reads[-1][0] - first_time
    after_first = sum(n for _, n in reads) - first_len
    # a late-woken device may start a frame up to CATCH_UP_S early and writes in bursts
    bound = wire_time_s(after_first - burst, baud) - CATCH_UP_S
    assert elapsed >= 0.9 * bound, f"{after_first} bytes in {elapsed:.3f} s, wire needs {bound:.3f}"
    # and the device is not starved either: reads come in small bursts, not one lump
    assert len(reads) > 10


@pytest.mark.integration
def test_each_frame_takes_its_wire_time_and_frames_keep_their_period() -> None:
    baud, frame_len, period = 9600, 48, 0.15  # 50 ms per frame on the wire
    burst = max(1, round(BURST_S / wire_time_s(1, baud)))
    with (
        CountingDevice(baud=baud, period_s=period, frame_len=frame_len) as device,
        raw_reader(device.port) as fd,
    ):
        reads = read_until(fd, 4 * frame_len)
    # the reads of each frame, split by the cumulative byte count
    starts: list[float] = []
    spans: list[tuple[float, int]] = []
    total = 0
    for stamp, n in reads:
        if total % frame_len == 0:
            starts.append(stamp)
            spans.append((stamp, n))
        total += n
        if total % frame_len == 0:
            first_stamp, first_n = spans[-1]
            spans[-1] = (stamp - first_stamp, first_n)
    for duration, first_n in spans:
        assert duration >= 0.8 * wire_time_s(frame_len - first_n - burst, baud)
    # a frame arriving in one lump would make the check above trivially true
    assert min(first_n for _, first_n in spans) < frame_len // 2
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3
    assert sum(gaps) >= 0.8 * 3 * period


# -- host side ---------------------------------------------------------------------------------


def make_driver(port: str, protocol: LineProtocol, **settings: float | None) -> SerialDriver:
    return SerialDriver("s1", SerialSettings(port=port, **settings), protocol)  # type: ignore[arg-type]


@pytest.mark.integration
def test_frames_become_readings_and_poll_follows_connected() -> None:
    collector = Collector()
    protocol = LineProtocol()
    with CountingDevice(period_s=None, frame_len=8) as device:
        driver = make_driver(device.port, protocol, poll_interval_s=0.05)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 4, "four answered polls")
                assert driver.state().available
                assert driver.link is not None
            finally:
                await stop(task)

        asyncio.run(scenario())
    assert protocol.calls[:2] == ["connected", "poll"]
    assert protocol.calls[-1] == "disconnected"
    assert collector.values()[:4] == [1, 2, 3, 4]
    assert {(r.sensor, r.quantity, r.unit) for r in collector.readings} == {("s1", "count", "/")}
    state = driver.state()
    assert (state.available, state.reason) == (False, "stopped")
    assert state.counters["lines"] == len(collector.readings)
    assert driver.link is None


@pytest.mark.integration
def test_no_poll_interval_means_poll_is_never_called() -> None:
    protocol = LineProtocol()
    collector = Collector()
    with CountingDevice(period_s=0.02) as device:
        driver = make_driver(device.port, protocol)

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 3, "streamed frames")
            finally:
                await stop(task)

        asyncio.run(scenario())
        assert device.questions == 0
    assert "poll" not in protocol.calls


@pytest.mark.integration
def test_a_hang_up_is_a_lost_port_and_the_link_comes_back(tmp_path: Path) -> None:
    collector = Collector()
    link = str(tmp_path / "ttyX")
    with CountingDevice(period_s=0.02, link=link) as device:
        driver = make_driver(link, LineProtocol())

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 3, "frames before unplug")
                device.unplug()
                await until(lambda: not driver.state().available, "the hang-up")
                assert driver.state().reason.startswith("port lost: hung up")
                before = len(collector.readings)
                device.replug()
                await until(lambda: len(collector.readings) >= before + 3, "frames after replug")
            finally:
                await stop(task)

        asyncio.run(scenario())
    assert driver.state().counters["reopens"] == 1
    assert driver.state().counters["spurious_wakes"] == 0


def test_poll_tells_a_hang_up_from_an_idle_tty() -> None:
    master, slave = os.openpty()
    try:
        with serial.Serial(os.ttyname(slave), 9600, timeout=0) as port:
            assert os.read(port.fileno(), 16) == b""  # an idle tty reads 0 bytes too ...
            assert not hung_up(port.fileno())  # ... but it has not hung up
            os.close(master)
            master = -1
            assert hung_up(port.fileno())
    finally:
        os.close(slave)
        if master >= 0:
            os.close(master)


@pytest.mark.integration
def test_a_spurious_wake_is_counted_and_never_mistaken_for_a_hang_up() -> None:
    collector = Collector()
    with CountingDevice(period_s=0.02) as device:
        driver = make_driver(device.port, LineProtocol())

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(collector))
            try:
                await until(lambda: len(collector.readings) >= 2, "first frames")
                session = driver._session
                assert session is not None
                device.set_silent(True)
                await asyncio.sleep(0.05)  # let the last frame drain
                session._on_readable()  # readiness reported, nothing to read
                session._on_readable()
                before = len(collector.readings)
                device.set_silent(False)
                await until(lambda: len(collector.readings) >= before + 3, "frames after it")
            finally:
                await stop(task)

        asyncio.run(scenario())
    counters = driver.state().counters
    assert counters["spurious_wakes"] == 2
    assert counters["reopens"] == 0


@pytest.mark.integration
def test_a_descriptor_stuck_readable_with_nothing_to_read_cannot_spin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # after the pty is gone the slave fd is readable forever and reads 0 bytes; with
    # hang-up detection blinded, every wake looks spurious: the pause must bound the rate
    monkeypatch.setattr("drivers.uart.host.hung_up", lambda fd: False)
    window_s = 0.5
    with CountingDevice(period_s=0.02) as device:
        driver = make_driver(device.port, LineProtocol())

        async def scenario() -> None:
            task = asyncio.create_task(driver.run(Collector()))
            try:
                await until(lambda: driver.state().available, "first frame")
                device.unplug()
                await asyncio.sleep(window_s)
            finally:
                await stop(task)

        asyncio.run(scenario())
    wakes = driver.state().counters["spurious_wakes"]
    assert 1 <= wakes <= 3 * window_s / 0.02  # a spinning reader would count thousands


@pytest.mark.integration
def test_the_port_is_exclusive_while_a_driver_holds_it() -> None:
    first_got = Collector()
    second_got = Collector()
    with CountingDevice(period_s=0.02) as device:
        first = make_driver(device.port, LineProtocol())
        second = SerialDriver("s2", SerialSettings(port=device.port), LineProtocol())

        async def scenario() -> None:
            tasks = [asyncio.create_task(first.run(first_got))]
            try:
                await until(lambda: len(first_got.readings) >= 2, "the first driver reading")
                with pytest.raises(serial.SerialException):
                    serial.Serial(device.port, 9600, exclusive=True)
                tasks.append(asyncio.create_task(second.run(second_got)))
                await until(lambda: "cannot open" in second.state().reason, "the refusal")
                before = len(first_got.readings)
                await until(lambda: len(first_got.readings) >= before + 3, "more frames")
            finally:
                for task in tasks:
                    await stop(task)

        asyncio.run(scenario())
    assert second_got.readings == []
    assert first.state().counters["reopens"] == 0


@pytest.mark.integration
def test_truncated_and_bad_frames_are_sent_as_asked() -> None:
    with CountingDevice(period_s=None, frame_len=20) as device, raw_reader(device.port) as fd:
        device.inject_truncated()
        device.inject_bad_checksum()  # b"#x\n"
        device.inject_noise(5)
        received = sum(n for _, n in read_until(fd, 1 + 3 + 5))
        while select.select([fd], [], [], 0.2)[0]:  # until the line has been quiet a while
            received += len(os.read(fd, 4096))
        assert (device.truncated_sent, device.bad_frames_sent) == (1, 1)
        assert received == device.bytes_sent
        assert 1 + 3 + 5 <= received < 20 + 3 + 5
