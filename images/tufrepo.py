"""The TUF repository that offers citygate bundles: its model on disk, keys and signing.

`Repository` is what `python -m images.repo` (images/repo.py, the command line) drives;
tests use it directly to build repositories and to craft attacks on gateways.

Layout (consistent snapshots: every file but timestamp.json carries its version):
    DIR/metadata/N.root.json, root.json (= the newest root), N.targets.json, N.snapshot.json,
                 timestamp.json
    DIR/targets/<sha256>.citygate-<version>.bundle   (target path: citygate-<version>.bundle)
    KEYS/<role>/<keyid>.pem   private keys, 0600, in a 0700 tree (default KEYS = DIR/keys)

Roles and keys: root signs the keys of every role (default 2 of 3 keys, offline), targets
signs which bundles exist and for whom (1 of 2, offline), snapshot and timestamp are online
(1 key each) and only re-sign the current state. A role's keys are replaced with `rotate`;
a new root is signed by a threshold of the old AND the new root keys, so gateways can follow
it. Retired keys move to KEYS/<role>/retired/.

Trust: this module trusts the key files under KEYS (it refuses any readable by group or
others) and the `BundleInfo` it is given; it signs whatever bundle it is told to add.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from packaging.version import InvalidVersion, Version
from securesystemslib.signer._crypto_signer import CryptoSigner  # re-exported implicitly only
from tuf.api._payload import MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.metadata import Metadata

from agent.durable import write_atomically

__all__ = [
    "EXPIRY_DAYS",
    "PRODUCT",
    "ROLES",
    "BundleInfo",
    "Policy",
    "RepoError",
    "Repository",
    "expiry",
    "target_path",
]

ROLES: Final = ("root", "targets", "snapshot", "timestamp")
#: days each role's metadata stays valid after signing
EXPIRY_DAYS: Final = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
PRODUCT: Final = "citygate"


class RepoError(Exception):
    """The repository, its keys or a bundle cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Policy:
    """How many keys each role has and how many must sign (snapshot/timestamp: 1 of 1)."""

    root_keys: int = 3
    root_threshold: int = 2
    targets_keys: int = 2
    targets_threshold: int = 1
    expiry_days: dict[str, int] = field(default_factory=lambda: dict(EXPIRY_DAYS))

    def keys(self, role: str) -> tuple[int, int]:
        """(number of keys, threshold) for `role`."""
        if role == "root":
            return self.root_keys, self.root_threshold
        if role == "targets":
            return self.targets_keys, self.targets_threshold
        return 1, 1

    def check(self) -> None:
        """Refuse thresholds that are impossible or that one stolen root key would meet."""
        for role in ROLES:
            count, threshold = self.keys(role)
            if not 1 <= threshold <= count:
                raise RepoError(f"{role}: threshold {threshold} needs 1..{count} keys")
        if self.root_threshold < 2:
            raise RepoError("root: threshold must be at least 2 (one lost root key is not root)")


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle says about itself (its manifest, or flags for a bundle without one)."""

    version: str
    platform: str
    python: str


def expiry(days: float, now: datetime | None = None) -> datetime:
    """The expiry `days` from `now` (default: the current UTC time), whole seconds."""
    return ((now or datetime.now(UTC)) + timedelta(days=days)).replace(microsecond=0)


def target_path(version: str) -> str:
    """The TUF target path of a bundle version."""
    return f"{PRODUCT}-{version}.bundle"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a published file (0644: the web server reads it) whole, durably (agent.durable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data, 0o644)


class Repository:
    """A repository on disk: the newest metadata of each role and the keys to sign it.

    `publish` is the careful path (bump version, fresh expiry, threshold of the role's own
    keys); tests craft attacks with `metadata`, `signers`, `new_signer` and `write`.
    """

    def __init__(self, path: Path, keys: Sequence[Path] = ()) -> None:
        self.path = path
        #: where private keys are looked for; new keys go into the first
        self.keys_dirs = tuple(keys) or (path / "keys",)
        self.policy = Policy()
        self._md: dict[str, Metadata[Any]] = {}

    @property
    def keys_dir(self) -> Path:
        """Where new keys are written."""
        return self.keys_dirs[0]

    @property
    def metadata_dir(self) -> Path:
        """DIR/metadata, as published."""
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        """DIR/targets, as published."""
        return self.path / "targets"

    # -- creating and loading --------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Path, keys: Sequence[Path] = (), policy: Policy | None = None
    ) -> Repository:
        """A new repository with fresh keys and version 1 of every role."""
        repo = cls(path, keys)
        repo.policy = policy or Policy()
        repo.policy.check()
        if (repo.metadata_dir / "1.root.json").exists():
            raise RepoError(f"{path}: already a repository (metadata/1.root.json exists)")
        days = repo.policy.expiry_days
        root = Root(expires=expiry(days["root"]), consistent_snapshot=True)
        for role in ROLES:
            count, threshold = repo.policy.keys(role)
            root.roles[role].threshold = threshold
            for _ in range(count):
                root.add_key(repo.new_signer(role).public_key, role)
        repo._md = {
            "root": Metadata(root),
            "targets": Metadata(Targets(expires=expiry(days["targets"]))),
            "snapshot": Metadata(Snapshot(expires=expiry(days["snapshot"]))),
            "timestamp": Metadata(Timestamp(expires=expiry(days["timestamp"]))),
        }
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        for role in ROLES:
            repo.publish(role, bump=False)
        return repo

    @classmethod
    def load(cls, path: Path, keys: Sequence[Path] = ()) -> Repository:
        """The repository at `path`: the newest version of each role's metadata."""
        repo = cls(path, keys)
        for role in ("root", "targets", "snapshot"):
            versions = [
                int(p.name.split(".", 1)[0])
                for p in repo.metadata_dir.glob(f"*.{role}.json")
                if p.name.split(".", 1)[0].isdigit()
            ]
            if not versions:
                raise RepoError(f"{repo.metadata_dir}: no N.{role}.json; run `init` first")
            repo._md[role] = Metadata.from_file(
                str(repo.metadata_dir / f"{max(versions)}.{role}.json")
            )
        repo._md["timestamp"] = Metadata.from_file(str(repo.metadata_dir / "timestamp.json"))
        root = repo.root
        repo.policy = Policy(
            root_keys=len(root.roles["root"].keyids),
            root_threshold=root.roles["root"].threshold,
            targets_keys=len(root.roles["targets"].keyids),
            targets_threshold=root.roles["targets"].threshold,
        )
        return repo

    # -- keys ------------------------------------------------------------------------------

    @property
    def root(self) -> Root:
        """The newest root (signed part)."""
        root: Root = self._md["root"].signed
        return root

    def new_signer(self, role: str) -> CryptoSigner:
        """A fresh ed25519 key for `role`, stored as KEYS/<role>/<keyid>.pem (0600)."""
        signer = CryptoSigner.generate_ed25519()
        role_dir = self.keys_dir / role
        role_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.keys_dir, 0o700)
        os.chmod(role_dir, 0o700)
        key_file = role_dir / f"{signer.public_key.keyid}.pem"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(signer.private_bytes)
            out.flush()
            os.fsync(out.fileno())
        return signer

    def signers(self, role: str) -> list[CryptoSigner]:
        """The private keys of `role` found under the key directories that root lists."""
        return [signer for _, signer in self._key_files(role)]

    def _key_files(self, role: str) -> list[tuple[Path, CryptoSigner]]:
        listed = set(self.root.roles[role].keyids)
        found: dict[str, tuple[Path, CryptoSigner]] = {}
        for key_file in sorted(p for d in self.keys_dirs for p in (d / role).glob("*.pem")):
            if key_file.stat().st_mode & 0o077:
                raise RepoError(
                    f"{key_file}: readable by others; chmod 600 it and check who saw it"
                )
            signer = CryptoSigner(load_pem_private_key(key_file.read_bytes(), None))
            if signer.public_key.keyid in listed:
                found.setdefault(signer.public_key.keyid, (key_file, signer))
        return list(found.values())

    # -- signing and writing ----------------------------------------------------------------

    def metadata(self, role: str) -> Metadata[Any]:
        """The newest metadata of `role` (edit it, then `publish` or `write`)."""
        return self._md[role]

    def write(self, role: str, md: Metadata[Any]) -> bytes:
        """Write `md` as it is (no checks) where gateways fetch `role`; return its bytes."""
        data = md.to_bytes()
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        _write_atomic(self.metadata_dir / name, data)
        if role == "root":
            _write_atomic(self.metadata_dir / "root.json", data)
        self._md[role] = md
        return data

    def publish(
        self,
        role: str,
        *,
        bump: bool = True,
        extra_signers: Sequence[CryptoSigner] = (),
        expires: datetime | None = None,
    ) -> bytes:
        """Sign `role` with a threshold of its keys (plus `extra_signers`) and write it."""
        md = self._md[role]
        if bump:
            md.signed.version += 1
        md.signed.expires = expires or expiry(self.policy.expiry_days[role])
        if role == "snapshot":
            md.signed.meta["targets.json"] = self._metafile("targets")
        if role == "timestamp":
            md.signed.snapshot_meta = self._metafile("snapshot")
        own = self.signers(role)
        threshold = self.root.roles[role].threshold
        if len(own) < threshold:
            raise RepoError(
                f"{role}: {len(own)} of its keys found under "
                f"{', '.join(str(d / role) for d in self.keys_dirs)}, {threshold} needed; "
                "bring the offline keys (--keys DIR, repeatable)"
            )
        md.signatures.clear()
        for signer in [*own, *extra_signers]:
            md.sign(signer, append=True)
        return self.write(role, md)

    def _metafile(self, role: str) -> MetaFile:
        """Version, length and sha256 of the published newest `role` file."""
        version = self._md[role].signed.version
        data = (self.metadata_dir / f"{version}.{role}.json").read_bytes()
        return MetaFile.from_data(version, data, ["sha256"])

    def publish_online(self) -> None:
        """New snapshot and timestamp versions over the current targets, fresh expiry."""
        self.publish("snapshot")
        self.publish("timestamp")

    # -- what the commands do ------------------------------------------------------------------

    def add_bundle(
        self,
        bundle: Path,
        info: BundleInfo,
        *,
        channel: str = "stable",
        hardware: Iterable[str] = ("*",),
        min_version: str = "0.0.0",
        replace: bool = False,
    ) -> TargetFile:
        """Copy `bundle` into targets/, list it in targets with its custom data, re-sign."""
        for label, value in (("version", info.version), ("min-version", min_version)):
            try:
                Version(value)
            except InvalidVersion:
                raise RepoError(f"{bundle}: {label} {value!r} is not a PEP 440 version") from None
        path = target_path(info.version)
        targets: Targets = self._md["targets"].signed
        if path in targets.targets and not replace:
            raise RepoError(f"{path} is already offered; pass --replace to offer other bytes")
        target = TargetFile.from_file(path, str(bundle), ["sha256"])
        target.unrecognized_fields["custom"] = {
            PRODUCT: {
                "version": info.version,
                "platform": info.platform,
                "python": info.python,
                "hardware": sorted(set(hardware)) or ["*"],
                "channel": channel,
                "min_version": min_version,
            }
        }
        dest = self.targets_dir / f"{target.hashes['sha256']}.{path}"
        if not dest.exists():
            _write_atomic(dest, bundle.read_bytes())
        targets.targets[path] = target
        self.publish("targets")
        self.publish_online()
        return target

    def remove_version(self, version: str) -> None:
        """Stop offering `version` (the bundle file stays for older snapshots)."""
        targets: Targets = self._md["targets"].signed
        if targets.targets.pop(target_path(version), None) is None:
            raise RepoError(f"{target_path(version)} is not offered")
        self.publish("targets")
        self.publish_online()

    def rotate(self, role: str) -> None:
        """Replace every key of `role` by a fresh one; publish the new root and re-sign."""
        old_root_signers = self.signers("root")
        old = self._key_files(role)
        root = self.root
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        for _ in range(self.policy.keys(role)[0]):
            root.add_key(self.new_signer(role).public_key, role)
        for key_file, _ in old:
            retired = key_file.parent / "retired"
            retired.mkdir(mode=0o700, exist_ok=True)
            os.replace(key_file, retired / key_file.name)
        self.publish("root", extra_signers=old_root_signers if role == "root" else ())
        if role == "targets":
            self.publish("targets")
        self.publish_online()
