"""The repository keeps the dependency direction of DESIGN.md §1 and the driver furniture.

drivers <- agent <- provisioning; images may use agent; tests and bench may
import anything; nothing imports tests or bench. Codecs import nothing (they
must also run on MicroPython).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("drivers", "agent", "provisioning", "images")
FORBIDDEN = {
    "drivers": {"agent", "provisioning", "images", "tests", "bench"},
    "agent": {"provisioning", "images", "tests", "bench"},
    "provisioning": {"images", "tests", "bench"},
    "images": {"provisioning", "tests", "bench"},
}
DRIVER_FILES = ("__init__.py", "codec.py", "driver.py", "emulator.py", "README.md", "sample.toml")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_the_dependency_direction_allows(package: str) -> None:
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _sources(package)
        for name in sorted(_imports(path) & FORBIDDEN[package])
    ]
    assert violations == []


def test_the_direction_check_would_catch_a_violation(tmp_path: Path) -> None:
    sneaky = tmp_path / "bad.py"
    sneaky.write_text("from agent.config import load_config\nimport provisioning.pki\n")
    assert _imports(sneaky) & FORBIDDEN["drivers"] == {"agent", "provisioning"}


def _driver_folders() -> list[Path]:
    return sorted(p for p in (ROOT / "drivers").iterdir() if (p / "codec.py").exists())


@pytest.mark.parametrize("folder", _driver_folders(), ids=lambda p: p.name)
def test_every_driver_folder_has_the_same_furniture(folder: Path) -> None:
    assert [name for name in DRIVER_FILES if not (folder / name).exists()] == []


@pytest.mark.parametrize("folder", _driver_folders(), ids=lambda p: p.name)
def test_codecs_import_nothing_so_they_run_on_micropython(folder: Path) -> None:
    assert _imports(folder / "codec.py") == set()


def test_every_driver_folder_is_registered() -> None:
    from drivers import family_names

    assert sorted(family_names()) == [p.name for p in _driver_folders()]
