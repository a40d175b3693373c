"""Command-line options of the test run, registered here so that every test ring sees them.

`--rig FILE` runs the hardware-in-the-loop scenarios (hil_tests/) on the rig
that FILE describes instead of the default emulated one; `--long` runs the
long variants of those scenarios (tests marked `long`), which are skipped
otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop scenarios (hil_tests/README.md)")
    group.addoption(
        "--rig",
        metavar="FILE",
        type=Path,
        default=None,
        help="rig description (TOML) to run the HIL scenarios on; default: the emulated rig",
    )
    group.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run the long variants of the HIL scenarios (marker `long`)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
