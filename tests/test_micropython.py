"""Every codec is MicroPython-portable: mpy-cross compiles it, MicroPython runs it the same.

The ring (tests/micropython/) discovers drivers/*/codec.py, compiles each with
mpy-cross, runs the compiled codecs under the MicroPython WebAssembly port in
one Node.js process and compares every probe (decode of every vector, the
other one-frame functions, the stream parsers, the family's extras) with
CPython; and type-checks the codecs with MicroPython's stubs as typeshed. The
last tests feed the ring codecs that are wrong on purpose, to prove it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.micropython import ring

CODECS = ring.discover()


def _require_node() -> None:
    try:
        ring.node_command()
    except ring.RingSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Every codec compiled by mpy-cross: family -> .mpy, or the compiler's error."""
    return ring.compile_mpy(CODECS, tmp_path_factory.mktemp("mpy"))


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for every stubs run here: the stubs are parsed once."""
    return tmp_path_factory.mktemp("mypy-cache")


def _report(results: list[ring.FamilyResult], limit: int = 12) -> str:
    lines = []
    for result in results:
        if not result.problems:
            continue
        lines.append(f"{result.family} ({len(result.problems)} problems, {result.probes} probes):")
        lines += [f"  {problem}" for problem in result.problems[:limit]]
        if len(result.problems) > limit:
            lines.append(f"  ... and {len(result.problems) - limit} more")
    return "\n".join(lines)


def test_the_ring_finds_the_codecs() -> None:
    assert "pms5003" in CODECS


@pytest.mark.parametrize("family", sorted(CODECS))
def test_every_family_has_vector_files_in_the_ring_table(family: str) -> None:
    files = ring.VECTOR_FILES.get(family)
    assert files, f"add {family} and its vector files to VECTOR_FILES in tests/micropython/ring.py"
    assert [name for name in files if not (ring.VECTORS / name).exists()] == []


def test_every_codec_compiles_with_mpy_cross(compiled: dict[str, Path | str]) -> None:
    failed = {family: error for family, error in compiled.items() if isinstance(error, str)}
    assert failed == {}, "mpy-cross rejects:\n" + "\n".join(f"{f}: {e}" for f, e in failed.items())


def test_every_codec_type_checks_against_the_micropython_stubs(
    tmp_path: Path, mypy_cache: Path
) -> None:
    status, errors, output = ring.typecheck(CODECS, tmp_path, mypy_cache)
    assert status in (0, 1), f"mypy did not run:\n{output}"
    assert errors == [], "against the MicroPython stubs:\n" + "\n".join(errors)


def test_every_codec_gives_the_same_results_under_micropython(
    compiled: dict[str, Path | str], tmp_path: Path
) -> None:
    _require_node()
    results = ring.run_ring(CODECS, tmp_path, compiled)
    if any(r.problems for r in results):
        pytest.fail("the MicroPython ring failed:\n" + _report(results), pytrace=False)
    assert all(r.probes > 0 for r in results)


# -- the ring can fail --------------------------------------------------------------------

_BROKEN = {
    # round(x, 2) rounds 2.675 to 2.67 under CPython, 2.68 under MicroPython
    "rounding": 'def decode(data):\n    return [("pm1", "ug/m3", round(2.675 + 0 * data[0], 2))]\n',
    # MicroPython's int.from_bytes takes no keyword arguments
    "signed": (
        "def decode(data: bytes) -> list[tuple[str, str, float]]:\n"
        '    return [("t", "Cel", float(int.from_bytes(data[:2], "big", signed=True)))]\n'
    ),
    "nodecode": "def decode_frame(data):\n    return []\n",
    "indexing": "def decode(data):\n    return [('n', 'u', float(data[99]))]\n",
    "portable": (
        "class BadFrame(ValueError):\n    pass\n\n\n"
        "def decode(data):\n    if len(data) != 32:\n"
        "        raise BadFrame('length %d' % len(data))\n"
        "    return [('pm1', 'ug/m3', data[5] * 0.1), ('n', '/', float(data[0]))]\n"
    ),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ring.FamilyResult]:
    """The ring run over codecs that are wrong on purpose, all fed the PMS5003 vectors."""
    _require_node()
    drivers = tmp_path_factory.mktemp("drivers")
    for family, source in _BROKEN.items():
        (drivers / family).mkdir()
        (drivers / family / "codec.py").write_text(source)
    codecs = ring.discover(drivers)
    work = tmp_path_factory.mktemp("broken")
    compiled = ring.compile_mpy(codecs, work)
    table = dict.fromkeys(_BROKEN, ("plantower_pms5003.json",))
    return {r.family: r for r in ring.run_ring(codecs, work, compiled, table)}


def test_the_ring_reports_a_value_micropython_computes_differently(
    broken: dict[str, ring.FamilyResult],
) -> None:
    problems = broken["rounding"].problems
    assert problems, "a codec using round(x, 2) passed the ring"
    assert "CPython -> [('pm1', 'ug/m3', 2.67)]" in problems[0]
    assert "MicroPython -> [('pm1', 'ug/m3', 2.68)]" in problems[0]


def test_the_ring_reports_a_builtin_micropython_lacks(broken: dict[str, ring.FamilyResult]) -> None:
    assert any("MicroPython raised TypeError" in p for p in broken["signed"].problems)


def test_the_ring_reports_a_codec_without_decode(broken: dict[str, ring.FamilyResult]) -> None:
    (problem,) = broken["nodecode"].problems
    assert problem.endswith("nodecode/codec.py has no decode(data: bytes) function")


def test_the_ring_reports_decode_raising_outside_the_value_error_family(
    broken: dict[str, ring.FamilyResult],
) -> None:
    assert any("raised IndexError" in p and "must raise" in p for p in broken["indexing"].problems)


def test_the_ring_passes_a_portable_codec(broken: dict[str, ring.FamilyResult]) -> None:
    assert broken["portable"].problems == []
    assert broken["portable"].probes > 0


def test_the_mpy_cross_step_reports_syntax_micropython_does_not_compile(tmp_path: Path) -> None:
    source = tmp_path / "codec.py"
    source.write_text(
        "def decode(data):\n    match data:\n        case _:\n            return []\n"
    )
    result = ring.compile_mpy({"matching": source}, tmp_path)["matching"]
    assert isinstance(result, str)
    assert "SyntaxError" in result


def test_the_stubs_type_check_rejects_a_module_micropython_lacks(
    tmp_path: Path, mypy_cache: Path
) -> None:
    source = tmp_path / "codec.py"
    source.write_text(
        "import dataclasses\n\n\ndef decode(data: bytes) -> list[object]:\n    return []\n"
    )
    status, errors, _output = ring.typecheck({"dataclassy": source}, tmp_path, mypy_cache)
    assert status == 1
    assert any("codec_dataclassy.py:1: error:" in line and "dataclasses" in line for line in errors)


def test_a_missing_npm_package_fails_with_the_make_venv_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ring, "NPM_PACKAGE", tmp_path / "absent")
    with pytest.raises(ring.RingSetupError, match=r"run `make venv`"):
        ring.node_command()


def test_the_stubs_type_check_knows_the_esp32_port_modules(
    tmp_path: Path, mypy_cache: Path
) -> None:
    source = tmp_path / "codec.py"
    source.write_text(
        "import machine\nimport time\n\n\ndef blink() -> None:\n"
        "    machine.Pin(2, machine.Pin.OUT).value(1)\n    time.sleep_ms(5)\n"
    )
    status, errors, output = ring.typecheck({"node": source}, tmp_path, mypy_cache)
    assert status in (0, 1), output
    assert errors == []
