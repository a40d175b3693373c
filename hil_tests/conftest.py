"""Fixtures of the HIL scenarios: the rig chosen on the command line, and the leak check.

`rig_spec` is the rig of `--rig FILE`, or the default emulated rig
(rigs/emulated.toml). Every test is checked, as in tests/, for threads and
child processes it leaves running.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hil_tests.rigfile import RigSpec, load_rig
from tests.conftest import no_leftovers

__all__ = ["no_leftovers", "rig_spec"]

RIGS = Path(__file__).resolve().parent / "rigs"
DEFAULT_RIG = RIGS / "emulated.toml"


@pytest.fixture(scope="session")
def rig_spec(request: pytest.FixtureRequest) -> RigSpec:
    """The rig the scenarios run on: `--rig FILE`, else the default emulated rig."""
    chosen: Path | None = request.config.getoption("--rig")
    return load_rig(chosen or DEFAULT_RIG)


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True with `--long`: scenarios with a short and a long variant pick the long one."""
    return bool(request.config.getoption("--long"))
