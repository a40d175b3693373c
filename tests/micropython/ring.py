"""The MicroPython portability ring: every codec under CPython and under real MicroPython.

For each family folder with a codec (drivers/*/codec.py) the ring builds
probes from that family's vector files (VECTOR_FILES): `decode` of every
vector, every other public function that takes one frame of bytes, every
stream parser fed all the vectors at once and byte by byte, the family's
extra probes (tests/micropython/extras.py), and `decode` of every frame
those calls built. It runs them in-process
under CPython, compiles the codecs with mpy-cross, runs the compiled codecs
in one Node.js process hosting the MicroPython WebAssembly port (ring.mjs),
and reports every outcome that differs.

Trust: the codecs are the code under test; the vector files and the npm
package pinned in package-lock.json are trusted inputs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tests.micropython import extras, probe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DRIVERS = ROOT / "drivers"
VECTORS = ROOT / "tests" / "vectors"
NODE_SCRIPT = HERE / "ring.mjs"
NPM_PACKAGE = HERE / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
NODE_TIMEOUT_S = 60.0  # the whole ring takes about a second

# family -> the vector files whose frames its codec must decode identically everywhere
VECTOR_FILES: dict[str, tuple[str, ...]] = {
    "pms5003": ("plantower_pms5003.json",),
    "maxbotix": ("maxbotix_mb7xxx.json",),
    "a02yyuw": ("dfrobot_a02yyuw.json", "jsn_sr04t.json"),
    "sds011": ("nova_sds011.json",),
    "sps30": ("sensirion_sps30.json",),
    "ruuvi": ("ruuvi_df5.json", "ruuvi_df6.json"),
    "bthome": ("bthome_v2.json",),
    "modbus": (
        "eastron_sdm120.json",
        "eastron_sdm630.json",
        "senseair_s8.json",
        "dfrobot_urm13_modbus.json",
        "modbus_rtu_common.json",
    ),
}
# keys of a vector entry that hold bytes worth decoding (besides "hex")
_HEX_KEYS = ("hex", "data_hex", "rtu_equivalent")

Probe = dict[str, object]
Outcome = dict[str, object]


class RingSetupError(Exception):
    """The ring cannot run on this machine (node or the npm package missing)."""


@dataclass
class FamilyResult:
    """What the ring found for one family; `problems` empty means it passed."""

    family: str
    probes: int = 0
    problems: list[str] = field(default_factory=list)


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def discover(drivers: Path = DRIVERS) -> dict[str, Path]:
    """family -> codec.py for every driver folder that has one."""
    return {p.parent.name: p for p in sorted(drivers.glob("*/codec.py"))}


def vector_inputs(files: tuple[str, ...], vectors: Path = VECTORS) -> list[tuple[str, bytes]]:
    """(label, bytes) for every hex string in the vector files, in file order."""
    inputs: list[tuple[str, bytes]] = []
    for name in files:
        data = json.loads((vectors / name).read_text())
        for section, entries in data.items():
            if not isinstance(entries, list):
                continue
            for index, entry in enumerate(entries):
                if not isinstance(entry, dict):
                    continue
                ident = entry.get("id", f"{section}[{index}]")
                for key in _HEX_KEYS:
                    if isinstance(entry.get(key), str):
                        label = f"{name}#{ident}" + ("" if key == "hex" else f".{key}")
                        inputs.append((label, bytes.fromhex(entry[key])))
    return inputs


def load_cpython(path: Path, name: str) -> ModuleType:
    """Import a codec file as a fresh module (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _takes_one_frame(function: Callable[..., object]) -> bool:
    """A public function whose first parameter is annotated bytes and the rest have defaults."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params or params[0].annotation not in (bytes, "bytes"):
        return False
    return all(p.default is not inspect.Parameter.empty for p in params[1:])


def _builds_without_arguments(cls: type) -> bool:
    try:
        cls()
    except Exception:  # a parser that needs arguments gets an explicit probe
        return False
    return True


def build_probes(family: str, module: ModuleType, inputs: list[tuple[str, bytes]]) -> list[Probe]:
    """Every probe for one family: decode, one-frame functions, stream parsers, extras."""
    probes: list[Probe] = [
        {"id": f"decode({label})", "call": "decode", "args": [probe.encode(raw)], "decode": True}
        for label, raw in inputs
    ]
    public = sorted((n, v) for n, v in vars(module).items() if not n.startswith("_"))
    for name, value in public:
        if name == "decode" or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value) and _takes_one_frame(value):
            probes += [
                {"id": f"{name}({label})", "call": name, "args": [probe.encode(raw)]}
                for label, raw in inputs
            ]
        elif inspect.isclass(value) and hasattr(value, "feed") and _builds_without_arguments(value):
            probes += stream_probes(name, [], b"".join(raw for _, raw in inputs))
    return probes + extras.probes_for(family, module)


def stream_probes(cls: str, init: list[object], stream: bytes) -> list[Probe]:
    """A parser fed `stream` in one chunk, and a fresh one fed it byte by byte."""
    args = [probe.encode(item) for item in init]
    whole = [probe.encode(stream)]
    single = [probe.encode(stream[i : i + 1]) for i in range(len(stream))]
    return [
        {"id": f"{cls}({init}).feed(all vectors)", "stream": cls, "init": args, "chunks": whole},
        {"id": f"{cls}({init}).feed(byte by byte)", "stream": cls, "init": args, "chunks": single},
    ]


def feedback_probes(probes: list[Probe], outcomes: list[Outcome]) -> list[Probe]:
    """decode of every distinct frame the codec built (commands, encoders, cut-out payloads)."""
    seen: set[str] = set()
    fed: list[Probe] = []
    for p, o in zip(probes, outcomes, strict=True):
        value = o.get("ok")
        if p.get("decode") or not isinstance(value, dict) or set(value) != {"b"}:
            continue
        if str(value["b"]) not in seen:
            seen.add(str(value["b"]))
            fed.append(
                {"id": f"decode({p['id']})", "call": "decode", "args": [value], "decode": True}
            )
    return fed


def contract_problems(probes: list[Probe], outcomes: list[Outcome]) -> list[str]:
    """decode must raise only ValueError or a subclass of it (under CPython)."""
    return [
        f"{p['id']}: CPython raised {o['raised']}({o.get('message', '')!r}), "
        "but decode must raise ValueError or a subclass"
        for p, o in zip(probes, outcomes, strict=True)
        if p.get("decode") and "raised" in o and not o.get("value_error")
    ]


def node_command() -> list[str]:
    """`node ring.mjs`, or RingSetupError saying how to install what is missing."""
    node = shutil.which("node")
    if node is None:
        raise RingSetupError(
            "node is not installed: run `make venv` (scripts/ensure-debian-packages.sh "
            "installs nodejs and npm)"
        )
    if not (NPM_PACKAGE / "micropython.mjs").exists():
        raise RingSetupError(
            f"{_shown(NPM_PACKAGE)} is missing: run `make venv` "
            "(it runs `npm ci --prefix tests/micropython`)"
        )
    return [node, str(NODE_SCRIPT)]


def compile_mpy(codecs: dict[str, Path], out_dir: Path) -> dict[str, Path | str]:
    """family -> compiled .mpy, or mpy-cross's error text."""
    results: dict[str, Path | str] = {}
    for family, source in codecs.items():
        target = out_dir / f"codec_{family}.mpy"
        done = subprocess.run(
            [sys.executable, "-m", "mpy_cross", "-s", f"{family}/codec.py", "-o", target, source],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        ok = done.returncode == 0 and target.exists()
        results[family] = target if ok else (done.stderr or done.stdout).strip()
    return results


def run_micropython(job: dict[str, object], work: Path) -> tuple[int, dict[str, object], str]:
    """Run ring.mjs on a job; (exit status, report, stderr)."""
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    try:
        done = subprocess.run(
            [*node_command(), str(job_file)],
            capture_output=True,
            text=True,
            check=False,
            timeout=NODE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, {}, f"no answer within {NODE_TIMEOUT_S:.0f} s (a codec looping for ever?)"
    try:
        report = json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    return done.returncode, report if isinstance(report, dict) else {}, done.stderr


def run_ring(
    codecs: dict[str, Path],
    work: Path,
    compiled: dict[str, Path | str] | None = None,
    vector_files: Mapping[str, tuple[str, ...]] = VECTOR_FILES,
) -> list[FamilyResult]:
    """Run every codec's probes under CPython and MicroPython; one result per family.

    `compiled` (from compile_mpy) makes MicroPython run the .mpy files, the
    form a sensor node gets; a family missing from it runs from source.
    """
    results = {family: FamilyResult(family) for family in codecs}
    families: dict[str, object] = {}
    for family, path in codecs.items():
        result = results[family]
        if family not in vector_files:
            result.problems.append(
                f"no vector files for {family}: add it to VECTOR_FILES in {Path(__file__).name}"
            )
        try:
            module = load_cpython(path, f"codec_{family}")
        except Exception as exc:  # reported as the family's failure
            result.problems.append(f"does not import under CPython: {exc!r}")
            continue
        if not callable(getattr(module, "decode", None)):
            result.problems.append(f"{_shown(path)} has no decode(data: bytes) function")
            continue
        probes = build_probes(family, module, vector_inputs(vector_files.get(family, ())))
        expected = probe.run_probes(module, probes)
        fed_back = feedback_probes(probes, expected)
        probes += fed_back
        expected += probe.run_probes(module, fed_back)
        result.probes = len(probes)
        result.problems += contract_problems(probes, expected)
        mpy = (compiled or {}).get(family)
        families[family] = {
            "file": str(mpy if isinstance(mpy, Path) else path),
            "probes": probes,
            "expected": expected,
        }
    if families:
        _run_families(families, results, work)
    return list(results.values())


def _run_families(
    families: dict[str, object], results: dict[str, FamilyResult], work: Path
) -> None:
    job: dict[str, object] = {"probe": str(HERE / "probe.py"), "families": families}
    status, report, stderr = run_micropython(job, work)
    if status not in (0, 1) or set(report) != set(families):
        for family in families:
            results[family].problems.append(
                f"the MicroPython ring did not run (exit {status}): {stderr.strip()[-2000:]}"
            )
        return
    for family, entry in report.items():
        if not isinstance(entry, dict):
            continue
        if entry.get("error"):
            results[family].problems.append(f"under MicroPython: {entry['error']}")
        results[family].problems += [
            f"differs under MicroPython: {line}" for line in entry.get("mismatches", [])
        ]


def _stub_tree(work: Path) -> tuple[Path, Path]:
    """(typeshed dir, board stubs dir): MicroPython's stdlib stubs and the ESP32 port's modules.

    micropython-stdlib-stubs (a dependency of micropython-esp32-stubs) is laid
    out like typeshed (stdlib/VERSIONS); the ESP32 modules (machine, time ...)
    and the shared _mpy_shed sit loose in site-packages, so they are linked
    into a folder of their own for mypy_path (site-packages itself is off).
    """
    stdlib = importlib.metadata.distribution("micropython-stdlib-stubs")
    typeshed = Path(str(stdlib.locate_file("stdlib/VERSIONS"))).parent.parent
    board = work / "esp32-stubs"
    board.mkdir(exist_ok=True)
    for dist, skip in (
        (importlib.metadata.distribution("micropython-esp32-stubs"), ()),
        (stdlib, ("stdlib", "stubs")),
    ):
        tops = {f.parts[0] for f in dist.files or [] if f.suffix == ".pyi"} - set(skip)
        for top in sorted(tops):
            link = board / top
            if not link.exists():
                link.symlink_to(Path(str(dist.locate_file(top))))
    return typeshed, board


def typecheck(
    codecs: dict[str, Path], work: Path, cache: Path | None = None
) -> tuple[int, list[str], str]:
    """mypy --strict over copies of the codecs against MicroPython's stubs only.

    Returns (mypy exit status, error lines about the codecs, full output).
    Lines about the stub modules themselves are dropped. `cache` (default: in
    `work`) lets several runs share mypy's cache of the stubs.
    """
    typeshed, board = _stub_tree(work)
    copies = []
    for family, path in codecs.items():
        copy = work / f"codec_{family}.py"
        copy.write_text(path.read_text())
        copies.append(copy.name)
    config = work / "mypy.ini"
    config.write_text(
        "[mypy]\nstrict = True\npython_version = 3.11\nno_site_packages = True\n"
        f"custom_typeshed_dir = {typeshed}\nmypy_path = {board}\n"
        f"cache_dir = {cache or work / '.mypy_cache'}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), *copies],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    output = done.stdout + done.stderr
    mine = [
        line for line in output.splitlines() if line.startswith("codec_") and ": error:" in line
    ]
    return done.returncode, mine, output
