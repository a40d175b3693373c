"""Gateway config files for lab set-ups: the demo, the tests and HIL rigs.

Writes the same TOML a technician would, from values: the identity files of a
lab client, a lab broker's address, and one table per sensor. Production
configs are written by people (docs/sample-gateway.toml) or the first-boot seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from provisioning.pki import LabFiles

#: sections for a lab: quick reconnects, small batches, short commit interval
LAB_TUNING: Mapping[str, Mapping[str, object]] = {
    "broker": {"connect_timeout_s": 3.0, "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
    "spool": {"commit_interval_s": 0.2, "batch_interval_s": 0.5, "batch_max_readings": 30},
}


def toml_value(value: object) -> str:
    """One TOML value (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_gateway_config(
    path: Path,
    *,
    lab: LabFiles,
    gateway: str,
    broker_port: int,
    state_dir: Path,
    sensors: Mapping[str, Mapping[str, object]],
    tuning: Mapping[str, Mapping[str, object]] = LAB_TUNING,
) -> Path:
    cert, key = lab.clients[gateway]
    sections: dict[str, dict[str, object]] = {
        "gateway": {"state_dir": state_dir, "log_level": "info"},
        "identity": {"key": key, "cert": cert, "ca": lab.ca_cert},
        "broker": {"host": "localhost", "port": broker_port},
        "spool": {},
    }
    for name, values in tuning.items():
        sections.setdefault(name, {}).update(values)
    lines = ["# written for a lab set-up by provisioning.labconfig"]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    for sensor_id, table in sensors.items():
        lines.append(f"[sensors.{sensor_id}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")
    return path
