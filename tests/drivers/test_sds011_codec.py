"""SDS011 codec and stream parser: vectors through `citygate decode`, properties, options."""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import OptionError, family
from drivers.sds011 import FAMILY, Sds011Options, codec
from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors" / "nova_sds011.json"
PACKAGE = Path(codec.__file__).parent
# vector field name -> our quantity name (the vectors' names are descriptive, not ours)
FIELD_TO_QUANTITY = {"pm2_5": "pm2_5", "pm10": "pm10"}
# what a reply's note says for each sub-command (the sleep/work erratum applied)
REPLY_NOTES = {
    "reply_mode_is_active": "reporting mode is active",
    "reply_mode_is_query": "reporting mode is query",
    "reply_set_query_mode": "reporting mode set to query",
    "reply_set_id": "device id set (device a001)",
    "reply_set_sleep": "work state set to sleeping",
    "reply_set_work": "work state set to working",
    "reply_query_state_working": "work state is working",
    "reply_query_state_sleeping": "work state is sleeping",
    "reply_period_1min": "working period set to 1 min",
    "reply_period_query_2min": "working period is 2 min",
    "reply_firmware": "firmware 2015-07-10",
}


def _vectors() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


def _cli_results() -> list[dict[str, Any]]:
    vectors = _vectors()
    result = citygate("decode", "sds011", *[v["hex"] for v in vectors])
    lines = result.stdout.splitlines()
    assert len(lines) == len(vectors), result.stderr
    return [json.loads(line) for line in lines]


def test_every_vector_decodes_as_documented_through_the_command_line() -> None:
    for vector, got in zip(_vectors(), _cli_results(), strict=True):
        where = vector["id"]
        if vector.get("expect_error"):
            assert got["ok"] is False, where
            assert "checksum" in got["error"], where
            continue
        assert got["ok"] is True, where
        values = {r["n"]: r["v"] for r in got["records"]}
        units = {r["u"] for r in got["records"]}
        expect = vector.get("expect", {})
        wanted = {FIELD_TO_QUANTITY[k]: v for k, v in expect.items() if k in FIELD_TO_QUANTITY}
        assert values == wanted, where
        assert units <= {"ug/m3"}, where
        if vector["kind"] == "command":
            assert got["note"].startswith("host command: "), where
        elif not wanted:
            assert REPLY_NOTES[where] in got["note"], where


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_field_matches_the_codec(vector: dict[str, Any]) -> None:
    wire = _hex(vector["hex"])
    if vector.get("expect_error"):
        with pytest.raises(codec.FrameError, match="bad checksum"):
            codec.decode(wire)
    elif vector["kind"] == "command":
        build = vector["build"]
        assert codec.command(build["sub"], _hex(build["data"]), build["id"]) == wire
        assert codec.parse_command(wire) == (build["sub"], _hex(build["data"]), build["id"])
    else:
        cmd, data = codec.parse_frame(wire)
        expect = vector["expect"]
        assert cmd == expect.get("command", cmd)
        if cmd == codec.CMD_DATA:
            assert codec.measurement(data) == (expect["pm2_5"], expect["pm10"], expect["device_id"])
        else:
            sub, d2, d3, d4, device = codec.reply_fields(data)
            assert sub == expect["sub_command"]
            assert [d2, d3, d4] == expect.get("data", [d2, d3, d4])
            assert device == expect.get("device_id", device)
            assert codec.reply_frame(sub, d2, d3, d4, device) == wire


def test_named_commands_match_the_documented_bytes() -> None:
    assert codec.set_mode(query=True, device_id=0xA160).hex(" ") == (
        "aa b4 02 01 01 00 00 00 00 00 00 00 00 00 00 a1 60 05 ab"
    )
    assert codec.set_mode(query=False) == _hex("AA B4 02 01 00" + " 00" * 10 + " FF FF 01 AB")
    assert codec.query_data() == _hex("AA B4 04" + " 00" * 12 + " FF FF 02 AB")
    assert codec.set_working(work=False, device_id=0xA160) == _hex(
        "AA B4 06 01 00 00 00 00 00 00 00 00 00 00 00 A1 60 08 AB"
    )
    assert codec.set_working(work=True, device_id=0xA160)[-2] == 0x09
    assert codec.set_period(1, device_id=0xA160)[-2] == 0x0B
    assert codec.set_period(0, device_id=0xA160)[-2] == 0x0A
    assert codec.get_setting(codec.SUB_PERIOD, 0xA160)[-2] == 0x09
    assert codec.get_setting(codec.SUB_FIRMWARE, 0xA160)[-2] == 0x08


def test_all_zero_measurement_is_warm_up_not_a_reading() -> None:
    frame = codec.data_frame(0, 0, 0xA160)
    assert codec.decode(frame) == []
    decoded = FAMILY.decode(frame, {})
    assert (decoded.records, decoded.note) == ([], "warming up: all-zero measurement")
    assert codec.decode(codec.data_frame(0, 1, 0xA160)) == [
        ("pm2_5", "ug/m3", 0.0),
        ("pm10", "ug/m3", 0.1),
    ]


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (_hex("AA C0 D4 04 3A 0A A1 60 1D"), "9 bytes"),
        (_hex("AB C0 D4 04 3A 0A A1 60 1D AB"), "bad head 0xab"),
        (_hex("AA C1 D4 04 3A 0A A1 60 1D AB"), "bad command byte 0xc1"),
        (_hex("AA C0 D4 04 3A 0A A1 60 1D AA"), "bad tail 0xaa"),
        (_hex("AA C0 D4 04 3A 0A A1 60 1E AB"), "expected 0x1d, frame has 0x1e"),
        (_hex("AA B4 04" + " 00" * 12 + " FF FF 03 AB"), "bad command checksum"),
        (_hex("AA B5 04" + " 00" * 12 + " FF FF 02 AB"), "bad command header"),
    ],
)
def test_bad_frames_are_rejected_with_a_precise_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(codec.FrameError, match=reason):
        codec.decode(wire)


def test_command_builders_refuse_values_the_protocol_cannot_carry() -> None:
    with pytest.raises(codec.FrameError, match="working period 31"):
        codec.set_period(31)
    with pytest.raises(codec.FrameError, match="13 bytes"):
        codec.command(codec.SUB_MODE, bytes(13))
    with pytest.raises(codec.FrameError, match="device id"):
        codec.command(codec.SUB_MODE, b"", 0x10000)


def test_replies_are_matched_by_sub_command_and_a_query_by_any_measurement() -> None:
    data = codec.parse_frame(codec.data_frame(10, 20, 1))
    mode = codec.parse_frame(codec.reply_frame(codec.SUB_MODE, 1, 1, 0, 1))
    assert codec.answers(codec.SUB_QUERY, *data)
    assert not codec.answers(codec.SUB_QUERY, *mode)
    assert codec.answers(codec.SUB_MODE, *mode)
    assert not codec.answers(codec.SUB_PERIOD, *mode)
    assert not codec.answers(codec.SUB_MODE, *data)


def test_stream_keeps_measurements_and_replies_apart_in_arrival_order() -> None:
    parser = codec.StreamParser()
    stream = (
        codec.data_frame(100, 200, 7)
        + codec.reply_frame(codec.SUB_PERIOD, 1, 5, 0, 7)
        + b"\xaa\xaa\x00"
        + codec.data_frame(101, 201, 7)
    )
    frames = parser.feed(stream)
    assert [cmd for cmd, _d in frames] == [codec.CMD_DATA, codec.CMD_REPLY, codec.CMD_DATA]
    assert codec.measurement(frames[2][1]) == (10.1, 20.1, 7)
    assert (parser.frames, parser.replies, parser.bad_bytes, parser.bad_frames) == (3, 1, 3, 0)


def test_bad_checksum_frame_is_counted_and_next_frame_recovered() -> None:
    parser = codec.StreamParser()
    bad = codec.data_frame(55, 66, 1, checksum_delta=1)
    frames = parser.feed(bad + codec.data_frame(77, 88, 1))
    assert [codec.measurement(d)[:2] for _c, d in frames] == [(7.7, 8.8)]
    assert parser.bad_frames == 1
    assert parser.bad_bytes == len(bad)


def test_truncated_frame_does_not_swallow_the_next_one() -> None:
    parser = codec.StreamParser()
    whole = codec.data_frame(12, 34, 0xA160)
    frames = parser.feed(whole[:6] + whole + whole)
    assert len(frames) == 2
    assert parser.bad_bytes == 6


def test_a_stream_split_at_every_boundary_decodes_the_same() -> None:
    stream = (
        b"\x01\xaa"
        + codec.data_frame(123, 456, 0xA160)
        + codec.reply_frame(codec.SUB_MODE, 1, 1, 0, 0xA160)[:7]  # truncated
        + codec.data_frame(0, 0, 0xA160)
        + b"\xaa\xc0"
        + codec.reply_frame(codec.SUB_PERIOD, 0, 2, 0, 0xA160)
    )
    whole = codec.StreamParser().feed(stream)
    assert [cmd for cmd, _d in whole] == [codec.CMD_DATA, codec.CMD_DATA, codec.CMD_REPLY]
    for cut in range(len(stream) + 1):
        parser = codec.StreamParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == whole, cut


frame_values = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
reply_values = st.tuples(st.sampled_from(sorted(codec.SUB_NAMES)), st.integers(0, 0xFF))
garbage_without_head = st.binary(max_size=40).map(lambda b: b.replace(b"\xaa", b"\x00"))


@given(
    items=st.lists(st.tuples(garbage_without_head, frame_values | reply_values), max_size=8),
    tail=garbage_without_head,
    cuts=st.lists(st.integers(1, 15), max_size=30),
)
def test_frames_separated_by_garbage_are_all_recovered_whatever_the_split(
    items: list[tuple[bytes, tuple[int, ...]]], tail: bytes, cuts: list[int]
) -> None:
    def encode(values: tuple[int, ...]) -> bytes:
        if len(values) == 3:
            return codec.data_frame(*values)
        return codec.reply_frame(values[0], 1, values[1], 0, 0xFFFF)

    stream = b"".join(garbage + encode(values) for garbage, values in items) + tail
    whole = codec.StreamParser().feed(stream)
    parser = codec.StreamParser()
    pieces: list[tuple[int, bytes]] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        pieces += parser.feed(stream[pos : pos + size])
        pos += size
    assert pieces == whole
    assert [encode(v)[1:8] for _g, v in items] == [bytes([c]) + d for c, d in whole]
    assert parser.bad_bytes == sum(len(g) for g, _v in items) + len(tail)


@given(chunks=st.lists(st.binary(max_size=32), max_size=20))
def test_arbitrary_bytes_never_raise_and_every_byte_is_accounted_for(chunks: list[bytes]) -> None:
    parser = codec.StreamParser()
    for chunk in chunks:
        parser.feed(chunk)
        assert parser.pending <= codec.MAX_PENDING
    consumed = codec.FRAME_LEN * parser.frames + parser.bad_bytes + parser.pending
    assert consumed == sum(len(c) for c in chunks)


@given(data=st.binary(max_size=24))
def test_any_bytes_decode_to_records_or_the_codec_error(data: bytes) -> None:
    try:
        records = codec.decode(data)
    except codec.FrameError:
        return  # the codec's own error, with a reason (checked by the tests above)
    assert all(unit == "ug/m3" for _q, unit, _v in records)


@given(values=frame_values)
def test_any_valid_frame_decodes_through_the_family(values: tuple[int, int, int]) -> None:
    pm2_5, pm10, device = values
    decoded = FAMILY.decode(codec.data_frame(pm2_5, pm10, device), {})
    if pm2_5 == pm10 == 0:
        assert decoded.records == []
        assert decoded.note
    else:
        assert decoded.records == [("pm2_5", "ug/m3", pm2_5 / 10), ("pm10", "ug/m3", pm10 / 10)]


def test_codec_imports_nothing_so_it_runs_on_micropython() -> None:
    tree = ast.parse((PACKAGE / "codec.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports == []


# -- options ---------------------------------------------------------------------------


def _sample_table() -> dict[str, Any]:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["sensors"]["air_2"]
    return table


def test_sample_config_is_accepted_by_the_registered_family() -> None:
    table = _sample_table()
    assert table["driver"] == family("sds011").name == "sds011"
    options = family("sds011").parse_options("air_2", table)
    assert options == Sds011Options(
        port="/dev/ttyUSB0",
        mode="query",
        poll_interval_s=300.0,
        sleep_between_polls=True,
        silence_timeout_s=900.0,
    )


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


def test_defaults_apply_when_only_the_port_is_given() -> None:
    options = FAMILY.parse_options("air_2", {"port": "/dev/ttyUSB0"})
    assert options == Sds011Options("/dev/ttyUSB0", 9600, "active", 1.0, 0, False, 30.0, 10.0)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"port": None}, "port"),
        ({"port": ""}, "port"),
        ({"baud": 9601}, "baud"),
        ({"mode": "passive"}, "mode"),
        ({"poll_interval_s": 0}, "poll_interval_s"),
        ({"warmup_s": -1}, "warmup_s"),
        ({"working_period_min": 31}, "working_period_min"),
        ({"working_period_min": 1.5}, "working_period_min"),
        ({"working_period_min": True}, "working_period_min"),
        ({"working_period_min": 2}, "working_period_min"),  # query mode: not allowed
        ({"sleep_between_polls": "yes"}, "sleep_between_polls"),
        ({"poll_interval_s": 20.0}, "sleep_between_polls"),  # not above warm-up + margin
        ({"silence_timeout_s": 100.0}, "silence_timeout_s"),  # not above the poll interval
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_option_raises_option_error_naming_the_key(changes: dict[str, Any], key: str) -> None:
    table = {**_sample_table(), "silence_timeout_s": 600.0, **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("air_2", table)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("table", "key"),
    [
        (
            {"mode": "active", "working_period_min": 5, "silence_timeout_s": 60.0},
            "silence_timeout_s",
        ),
        ({"mode": "active", "sleep_between_polls": True}, "sleep_between_polls"),
    ],
)
def test_active_mode_options_are_checked_together(table: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("air_2", {"port": "/dev/ttyUSB0", **table})
    assert info.value.key == key


def test_create_rejects_options_of_another_family() -> None:
    with pytest.raises(TypeError):
        FAMILY.create("air_2", {"port": "/dev/ttyUSB0"})


def test_created_driver_is_unavailable_until_it_runs() -> None:
    driver = FAMILY.create("air_2", FAMILY.parse_options("air_2", _sample_table()))
    state = driver.state()
    assert driver.sensor_id == "air_2"
    assert (state.available, state.reason) == (False, "not started")
    assert {"frames", "replies", "bad_frames", "bad_bytes", "warmup_frames"} <= set(state.counters)
