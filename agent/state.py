"""Small, human-readable gateway state in TinyDB, written crash-safe.

DESIGN.md §2: sensor inventory, learned calibration and OTA history live in a
JSON document a technician can read. TinyDB's own JSON storage rewrites the
file in place, so a power cut mid-write leaves half a file. `AtomicJSONStorage`
writes a temporary file, fsyncs it, renames it over the old one and fsyncs
the directory: after a crash the file is the old version or the new one.

`Inventory` records devices the gateway hears but has no config for (e.g. a
BLE sensor a technician has just mounted), so `citygate doctor` and health
can list them for adoption. It writes only when something a technician needs
changes (a new device, or once per `REFRESH_S` for last-seen times), never per
advertisement: flash wear is a budget.

Trusts: its own file; a corrupt file is reported, set aside and started anew.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinydb import Query, TinyDB
from tinydb.storages import Storage

from agent.durable import write_atomically

log = logging.getLogger(__name__)

REFRESH_S = 3600.0


class AtomicJSONStorage(Storage):
    """A TinyDB storage that replaces its file atomically and durably on every write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            aside = self._path.with_name(f"{self._path.name}.corrupt-{int(time.time())}")
            os.replace(self._path, aside)
            log.error(
                "state file %s is corrupt (%s); kept as %s, starting anew", self._path, exc, aside
            )
            return None
        return data if isinstance(data, dict) else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
        write_atomically(self._path, body, 0o640)

    def close(self) -> None:
        pass


def open_state(path: Path) -> TinyDB:
    return TinyDB(path, storage=AtomicJSONStorage)


class Inventory:
    """Devices heard but not configured; table `unknown_devices` of the state file."""

    def __init__(self, db: TinyDB, *, clock: Callable[[], float] = time.time) -> None:
        self._table = db.table("unknown_devices")
        self._clock = clock
        self._written: dict[str, float] = {
            str(row["address"]): float(row.get("last_seen", 0.0)) for row in self._table.all()
        }

    def heard(self, address: str, kind: str, rssi: int | None) -> bool:
        """Note an unconfigured device; True when the state file was written."""
        now = self._clock()
        last_write = self._written.get(address)
        if last_write is not None and now - last_write < REFRESH_S:
            return False
        row = {"address": address, "kind": kind, "rssi": rssi, "last_seen": now}
        device = Query()
        if last_write is None:
            row["first_seen"] = now
            log.info(
                "unknown %s device %s heard; adopt it with a [sensors.<id>] table", kind, address
            )
        self._table.upsert(row, device.address == address)
        self._written[address] = now
        return True

    def devices(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._table.all()]
