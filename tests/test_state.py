"""Gateway state: crash-safe TinyDB storage and the inventory of unconfigured devices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from agent.state import REFRESH_S, Inventory, open_state


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_inventory_records_a_new_device_once_and_refreshes_it_rarely(tmp_path: Path) -> None:
    clock = _Clock()
    inventory = Inventory(open_state(tmp_path / "state.json"), clock=clock)
    assert inventory.heard("AA:BB:CC:DD:EE:01", "ruuvi", -70)
    clock.now += 5
    assert not inventory.heard("AA:BB:CC:DD:EE:01", "ruuvi", -71)  # no write per advertisement
    clock.now += REFRESH_S
    assert inventory.heard("AA:BB:CC:DD:EE:01", "ruuvi", -72)
    (device,) = Inventory(open_state(tmp_path / "state.json"), clock=clock).devices()
    assert device["kind"] == "ruuvi"
    assert device["first_seen"] == 1_000_000.0
    assert device["last_seen"] == clock.now


def test_state_survives_restart_and_stays_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    Inventory(open_state(path)).heard("AA:BB:CC:DD:EE:02", "bthome", None)
    assert [d["address"] for d in Inventory(open_state(path)).devices()] == ["AA:BB:CC:DD:EE:02"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_corrupt_state_file_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"unknown_devices": {"1": ')
    inventory = Inventory(open_state(path))
    assert inventory.devices() == []
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_sigkill_during_writes_never_leaves_a_broken_state_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    writer = textwrap.dedent(
        f"""
        from pathlib import Path
        from agent.state import Inventory, open_state
        inv = Inventory(open_state(Path({str(path)!r})), clock=iter(range(10**9)).__next__)
        i = 0
        while True:
            inv.heard(f"AA:BB:CC:DD:{{i // 256 % 256:02X}}:{{i % 256:02X}}", "ruuvi", -60)
            i += 1
        """
    )
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        try:
            proc.wait(timeout=0.4)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if path.exists():
            Inventory(open_state(path)).devices()  # parses, or this raises
            assert not list(tmp_path.glob("state.json.corrupt-*"))
