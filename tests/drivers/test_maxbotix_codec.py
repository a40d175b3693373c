"""MaxBotix codec, stream parser and options: vectors through the CLI, properties, sample config."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import OptionError, family
from drivers.maxbotix import FAMILY, FrameError, MaxbotixOptions, StreamParser, codec
from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors" / "maxbotix_mb7xxx.json"
PACKAGE = Path(codec.__file__).parent
# (unit, no-target value) of a vector's "model" -> our model name
MODEL_OF = {("mm", 5000): "hrxl", ("mm", 9999): "hrxl_10m", ("cm", None): "xl"}
METRES_PER = {"mm": 0.001, "cm": 0.01}


def _vectors() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _is_stream(vector: dict[str, Any]) -> bool:
    return str(vector["id"]).startswith("stream")


def _model(vector: dict[str, Any]) -> str:
    return MODEL_OF[(vector["model"]["unit"], vector["model"]["no_target"])]


def _metres(vector: dict[str, Any]) -> list[object]:
    per = METRES_PER[vector["expect"]["unit"]]
    return [pytest.approx(v * per) for v in vector["expect"]["readings"]]


@pytest.mark.integration
def test_every_frame_vector_decodes_through_the_cli() -> None:
    frames = [v for v in _vectors() if not _is_stream(v)]
    result = citygate("decode", "maxbotix", *[v["hex"] for v in frames])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(frames), result.stderr
    for vector, line in zip(frames, lines, strict=True):
        assert line["ok"] is True, (vector["id"], line)
        if vector["expect"]["no_target"]:
            assert (line["records"], line["note"]) == ([], "no echo"), vector["id"]
        else:
            assert [(r["n"], r["u"]) for r in line["records"]] == [("distance", "m")]
            assert [r["v"] for r in line["records"]] == _metres(vector), vector["id"]


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_decodes_with_its_own_model(vector: dict[str, Any]) -> None:
    parser = StreamParser(_model(vector))
    got = parser.feed(bytes.fromhex(vector["hex"]))
    distances = [records[0][2] for records, note in got if not note]
    if vector["expect"].get("no_target"):
        assert (distances, parser.no_echo) == ([], 1)
    else:
        assert distances == _metres(vector)
    if not _is_stream(vector):
        decoded = FAMILY.decode(bytes.fromhex(vector["hex"]), {"model": _model(vector)})
        assert [r[2] for r in decoded.records] == distances


def test_stream_vectors_count_what_they_skip() -> None:
    by_id = {v["id"]: v for v in _vectors()}
    parser = StreamParser("hrxl")
    parser.feed(bytes.fromhex(by_id["stream_resync_mid_frame"]["hex"]))
    assert (parser.frames, parser.bad_bytes, parser.bad_frames) == (2, 3, 0)
    parser = StreamParser("hrxl")
    parser.feed(bytes.fromhex(by_id["stream_corrupt_frame_skipped"]["hex"]))
    assert (parser.frames, parser.bad_bytes, parser.bad_frames) == (1, 6, 1)


@pytest.mark.parametrize(
    ("model", "frame", "metres"),
    [
        ("hrxl", b"R0300\r", 0.3),
        ("hrxl_10m", b"R5000\r", 5.0),  # a distance on a 10 m part, no-target on a 5 m one
        ("xl", b"R1068\r", 10.68),
        ("lv", b"R123\r", 3.1242),
        ("lv", b"R255 \r", 6.477),
    ],
)
def test_models_fix_the_unit(model: str, frame: bytes, metres: float) -> None:
    [(quantity, unit, value)] = codec.decode_model(frame, model)
    assert (quantity, unit) == ("distance", "m")
    assert value == pytest.approx(metres)


@pytest.mark.parametrize(
    ("model", "frame", "reason"),
    [
        ("hrxl", b"R6000\r", "beyond"),
        ("hrxl", b"R123\r", "3 digits do not fit"),
        ("lv", b"R256\r", "beyond"),
        ("auto", b"R12\r", "5 to 7"),
        ("auto", b"R12345\r", "expected 3 or 4 digits"),
        ("auto", b"X1234\r", "start with 'R'"),
        ("auto", b"R1234\n", "end with CR"),
        ("auto", b"R12 4\r", "non-digit 0x20"),
        ("nosuch", b"R1234\r", "unknown model"),
    ],
)
def test_bad_frames_are_rejected_with_a_precise_reason(
    model: str, frame: bytes, reason: str
) -> None:
    with pytest.raises(FrameError, match=reason):
        codec.decode_model(frame, model)


def test_no_target_is_a_note_not_a_distance() -> None:
    assert FAMILY.decode(b"R5000\r", {}).records == []
    assert FAMILY.decode(b"R5000\r", {}).note == "no echo"
    assert FAMILY.decode(b"R9999\r", {"profile": "hrxl_10m"}).note == "no echo"


def test_pending_input_stays_bounded_on_endless_digits() -> None:
    parser = StreamParser("hrxl")
    for _ in range(100):
        parser.feed(b"R1234567890")
        assert parser.pending < codec.MAX_FRAME


# -- properties ------------------------------------------------------------------------------

values = st.integers(300, 4999)
garbage = st.binary(max_size=20).map(lambda b: b.replace(b"R", b"r"))


@given(data=st.binary(max_size=12))
def test_any_bytes_decode_or_raise_the_codec_error(data: bytes) -> None:
    try:
        records = codec.decode(data)
    except FrameError:
        return
    assert all(q == "distance" and u == "m" for q, u, _v in records)


@given(chunks=st.lists(st.binary(max_size=16), max_size=10))
def test_arbitrary_stream_never_raises(chunks: list[bytes]) -> None:
    parser = StreamParser("hrxl")
    for chunk in chunks:
        parser.feed(chunk)
        assert parser.pending < codec.MAX_FRAME


@given(items=st.lists(st.tuples(garbage, values), max_size=6), tail=garbage)
def test_frames_separated_by_garbage_are_all_recovered(
    items: list[tuple[bytes, int]], tail: bytes
) -> None:
    stream = b"".join(g + codec.frame_for(v, 4) for g, v in items) + tail
    got = StreamParser("hrxl").feed(stream)
    assert [records[0][2] for records, _note in got] == [pytest.approx(v / 1000) for _g, v in items]


@given(
    items=st.lists(st.tuples(st.binary(max_size=6), st.integers(0, 9999)), max_size=5),
    model=st.sampled_from(["auto", "hrxl", "hrxl_10m", "xl"]),
)
def test_a_stream_split_at_every_boundary_decodes_the_same(
    items: list[tuple[bytes, int]], model: str
) -> None:
    stream = b"".join(g + codec.frame_for(v, 4) for g, v in items)
    whole = StreamParser(model)
    expected = whole.feed(stream)
    for cut in range(len(stream) + 1):
        split = StreamParser(model)
        assert split.feed(stream[:cut]) + split.feed(stream[cut:]) == expected
        assert (split.frames, split.bad_bytes) == (whole.frames, whole.bad_bytes)
    single = StreamParser(model)
    assert [x for i in range(len(stream)) for x in single.feed(stream[i : i + 1])] == expected


# -- options -----------------------------------------------------------------------------------


def _sample_table() -> dict[str, Any]:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["sensors"]["bin_1"]
    return table


def test_sample_config_is_accepted_by_the_registered_family() -> None:
    table = _sample_table()
    assert table["driver"] == family("maxbotix").name == "maxbotix"
    options = family("maxbotix").parse_options("bin_1", table)
    assert options == MaxbotixOptions(port="/dev/ttyAMA0", model="hrxl")


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"port": None}, "port"),
        ({"port": 7}, "port"),
        ({"model": None}, "model"),
        ({"model": "auto"}, "model"),
        ({"model": "HRXL"}, "model"),
        ({"baud": 9601}, "baud"),
        ({"silence_timeout_s": 0}, "silence_timeout_s"),
        ({"silence_timeout_s": "5"}, "silence_timeout_s"),
        ({"mode": "passive"}, "mode"),
    ],
)
def test_bad_option_raises_option_error_naming_the_key(changes: dict[str, Any], key: str) -> None:
    table = {**_sample_table(), **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("bin_1", table)
    assert info.value.key == key


def test_create_rejects_options_of_another_family() -> None:
    with pytest.raises(TypeError):
        FAMILY.create("bin_1", {"port": "/dev/ttyAMA0"})
