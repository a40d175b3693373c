"""`citygate selftest [--config FILE]`: does this release work on this gateway?

The OTA flow runs a new release's own `bin/citygate selftest` before switching to
it (agent.ota.release), so the checks run with that release's code and libraries:

- imports: every module of the agent, drivers and provisioning packages imports;
- cose: a SenML pack signed as COSE_Sign1 with a throwaway Ed25519 and P-256 key
  opens again with the matching public key (and not with a wrong topic);
- senml: a SenML pack survives a CBOR round trip value for value;
- sqlite: an in-memory SQLite database takes a table, a row and a query;
- with --config: the config loads, the identity key, certificate and CA are
  readable and parse (a clock before the certificate is tolerated, as the service
  does), and the state directory takes a new file.

Offline and quick (well under 3 s): it opens no socket and touches neither the
spool nor the broker; in the state directory it creates and deletes one temporary
file. One line per check; exit 0 when all pass, 1 otherwise.

Trust: the config file is checked by agent.config like at start-up; the checks
only read the identity files.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import ConfigError, load_config
from agent.envelope import (
    EnvelopeError,
    TrustedKey,
    encode_senml,
    open_sealed,
    seal,
    signer_for,
)
from agent.identity import IdentityError, load_identity
from agent.keys import PrivateKey
from drivers.base import Reading

#: the packages a release must be able to import in full
PACKAGES = ("agent", "drivers", "provisioning")
_GATEWAY = "selftest"
_TOPIC = f"citygate/{_GATEWAY}/telemetry"
_READINGS = (
    Reading("s1", "pm2_5", 12.5, "ug/m3", 1_767_225_600.0),
    Reading("s1", "temperature", -3.25, "Cel", 1_767_225_601.5),
)

#: one check's result: (name, passed, detail)
Result = tuple[str, bool, str]


class CheckFailed(Exception):
    """A check did not pass; the message says what was found."""


def _imports() -> str:
    count = 0
    for name in PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, f"{name}."):
            if module.name.rpartition(".")[2] == "__main__":  # runs a program when imported
                continue
            importlib.import_module(module.name)
            count += 1
    return f"{count} modules"


def _cose() -> str:
    keys: list[PrivateKey] = [Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())]
    for key in keys:
        signer = signer_for(key)
        trusted = {signer.kid: TrustedKey(_GATEWAY, key.public_key())}
        senml = encode_senml(_GATEWAY, _READINGS)
        sealed = seal(senml, signer=signer, gateway_id=_GATEWAY, seq=7, iat=1, topic=_TOPIC)
        message = open_sealed(sealed, _TOPIC, trusted)
        if message.seq != 7 or len(message.records) != len(_READINGS):
            raise CheckFailed(f"alg {signer.alg}: opened message differs from the one sealed")
        try:
            open_sealed(sealed, f"{_TOPIC}x", trusted)
        except EnvelopeError:
            continue
        raise CheckFailed(f"alg {signer.alg}: a message opened under another topic")
    return "EdDSA and ES256 sign and verify"


def _senml() -> str:
    pack = cbor2.loads(encode_senml(_GATEWAY, _READINGS))
    values = [record.get(2) for record in pack]
    want = [reading.value for reading in _READINGS]
    if len(values) != len(want) or not all(
        isinstance(v, int | float) and math.isclose(v, w) for v, w in zip(values, want, strict=True)
    ):
        raise CheckFailed(f"values {values} came back for {want}")
    return f"{len(pack)} records round-trip"


def _sqlite() -> str:
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        db.execute("INSERT INTO t (v) VALUES (?)", (b"citygate",))
        row = db.execute("SELECT v FROM t WHERE k = 1").fetchone()
    finally:
        db.close()
    if row != (b"citygate",):
        raise CheckFailed(f"read back {row!r}")
    return f"SQLite {sqlite3.sqlite_version}"


def _config_checks(path: Path) -> list[tuple[str, Callable[[], str]]]:
    """The checks of a config file: it loads, then its identity and state directory."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        error = str(exc)

        def failed() -> str:
            raise CheckFailed(error)

        return [("config", failed)]

    def identity() -> str:
        ident = config.identity
        loaded = load_identity(ident.key, ident.cert, ident.ca, early_clock_ok=True)
        return f"gateway {loaded.gateway_id}, certificate valid until {loaded.not_after:%Y-%m-%d}"

    def state_dir() -> str:
        directory = config.gateway.state_dir
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".selftest-"):
                pass
        except OSError as exc:
            raise CheckFailed(f"{directory} is not writable: {exc.strerror or exc}") from exc
        return f"{directory} is writable"

    return [("config", lambda: f"{path} loads"), ("identity", identity), ("state", state_dir)]


def run_selftest(config: Path | None) -> list[Result]:
    """Run every check (the config's too when given); one result per check, in order."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("imports", _imports),
        ("cose", _cose),
        ("senml", _senml),
        ("sqlite", _sqlite),
    ]
    if config is not None:
        checks += _config_checks(config)
    results: list[Result] = []
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except (CheckFailed, IdentityError, OSError) as exc:
            results.append((name, False, str(exc)))
        except Exception as exc:  # a broken release fails in ways nobody listed: report them all
            results.append((name, False, f"{type(exc).__name__}: {exc}"))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="also check this gateway config, its identity and state")


def main(args: argparse.Namespace) -> int:
    """Print one line per check; 0 when every check passed, 1 otherwise."""
    results = run_selftest(Path(args.config) if args.config else None)
    for name, passed, detail in results:
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {' '.join(detail.split())}")
    return 0 if all(passed for _, passed, _ in results) else 1
