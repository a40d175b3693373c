"""The TUF repository that offers citygate bundles to gateways: `python -m images.repo`.

Commands (all keep the layout gateways fetch from; publish DIR/metadata and DIR/targets):

    python -m images.repo init DIR [--keys KEYS] [--root-keys 3 --root-threshold 2 ...]
    python -m images.repo add DIR BUNDLE [--channel stable] [--hardware H ...] [--min-version V]
    python -m images.repo remove DIR VERSION
    python -m images.repo sign DIR [--role root|targets ...]   # run daily: timestamp lasts 1 day
    python -m images.repo rotate DIR ROLE

Layout (consistent snapshots: every file but timestamp.json carries its version):
    DIR/metadata/N.root.json, root.json (= the newest root), N.targets.json, N.snapshot.json,
                 timestamp.json
    DIR/targets/<sha256>.citygate-<version>.bundle   (target path: citygate-<version>.bundle)
    KEYS/<role>/<keyid>.pem   private keys, 0600, in a 0700 tree (default KEYS = DIR/keys)

Publish DIR/metadata and DIR/targets only, never DIR itself (nor copy DIR to a stick):
the default key directory is inside it. In production keep the root and targets keys
offline and pass every key directory a command needs: `--keys /media/offline --keys
/srv/online-keys` (repeatable; `init` and `rotate` write new keys into the first).

Roles and keys: root signs the keys of every role (default 2 of 3 keys, offline), targets
signs which bundles exist and for whom (1 of 2, offline), snapshot and timestamp are online
(1 key each) and only re-sign the current state. A role's keys are replaced with `rotate`;
a new root is signed by a threshold of the old AND the new root keys, so gateways can follow
it. Retired keys move to KEYS/<role>/retired/.

Trust: this tool trusts the key files under KEYS (it refuses any readable by group or
others) and the bundle manifest it is given; it signs whatever bundle it is told to add.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from packaging.version import InvalidVersion, Version
from securesystemslib.signer._crypto_signer import CryptoSigner  # re-exported implicitly only
from tuf.api._payload import MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.metadata import Metadata

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
    """Write a published file (0644) via a fsynced temp file and rename; fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # published: the web server reads it
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def _bundle_info(bundle: Path, args: argparse.Namespace) -> BundleInfo:
    """The bundle's manifest (agent.ota.bundle) or, failing that, --version/--platform/--python."""
    if args.version and args.platform and args.python:
        return BundleInfo(args.version, args.platform, args.python)
    try:
        from agent.ota.bundle import BundleError, read_manifest
    except ImportError:
        raise RepoError(
            f"{bundle}: agent.ota.bundle is not available; pass --version, --platform, --python"
        ) from None
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        raise RepoError(f"{bundle}: not a citygate bundle: {exc}") from exc
    if manifest.name != PRODUCT:
        raise RepoError(f"{bundle}: manifest name is {manifest.name!r}, not {PRODUCT!r}")
    return BundleInfo(
        args.version or manifest.version,
        args.platform or manifest.platform,
        args.python or manifest.python,
    )


def _policy(args: argparse.Namespace) -> Policy:
    days = dict(EXPIRY_DAYS)
    for role in ROLES:
        value = getattr(args, f"{role}_expiry_days", None)
        if value is not None:
            days[role] = value
    return Policy(
        root_keys=getattr(args, "root_keys", 3),
        root_threshold=getattr(args, "root_threshold", 2),
        targets_keys=getattr(args, "targets_keys", 2),
        targets_threshold=getattr(args, "targets_threshold", 1),
        expiry_days=days,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m images.repo", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "init": "create keys and version 1 of every role",
        "add": "offer a bundle",
        "remove": "stop offering a version",
        "sign": "re-sign snapshot and timestamp (and --role ones) with fresh expiry",
        "rotate": "replace the keys of a role",
    }
    for name, help_text in commands.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("dir", type=Path, help="repository directory")
        cmd.add_argument(
            "--keys",
            type=Path,
            action="append",
            default=[],
            help="key directory, repeatable; new keys go into the first (default DIR/keys)",
        )
        for role in ROLES:
            cmd.add_argument(
                f"--{role}-expiry-days",
                type=float,
                metavar="DAYS",
                help=f"{role} validity (default {EXPIRY_DAYS[role]})",
            )
    init = sub.choices["init"]
    init.add_argument("--root-keys", type=int, default=3)
    init.add_argument("--root-threshold", type=int, default=2)
    init.add_argument("--targets-keys", type=int, default=2)
    init.add_argument("--targets-threshold", type=int, default=1)
    add = sub.choices["add"]
    add.add_argument("bundle", type=Path)
    add.add_argument("--channel", default="stable")
    add.add_argument("--hardware", nargs="+", default=["*"], help="hardware names, * for all")
    add.add_argument("--min-version", default="0.0.0", help="lowest installed version it updates")
    add.add_argument("--version", help="override/replace the manifest's version")
    add.add_argument("--platform", help="override/replace the manifest's platform")
    add.add_argument("--python", help="override/replace the manifest's python")
    add.add_argument("--replace", action="store_true", help="offer other bytes for a version")
    sub.choices["remove"].add_argument("version")
    sub.choices["sign"].add_argument(
        "--role",
        action="append",
        choices=["root", "targets"],
        default=[],
        help="also re-sign this offline role",
    )
    sub.choices["rotate"].add_argument("role", choices=ROLES)
    return parser


def run(args: argparse.Namespace) -> str:
    """Run one parsed command; return what to print."""
    if args.command == "init":
        repo = Repository.create(args.dir, args.keys, _policy(args))
        return (
            f"{args.dir}: new repository; ship {repo.metadata_dir / '1.root.json'} to gateways; "
            f"publish metadata/ and targets/ only; keep root and targets keys offline"
        )
    repo = Repository.load(args.dir, args.keys)
    repo.policy = replace(repo.policy, expiry_days=_policy(args).expiry_days)
    if args.command == "add":
        info = _bundle_info(args.bundle, args)
        target = repo.add_bundle(
            args.bundle,
            info,
            channel=args.channel,
            hardware=args.hardware,
            min_version=args.min_version,
            replace=args.replace,
        )
        return f"offered {target.path} ({target.length} bytes, {args.channel})"
    if args.command == "remove":
        repo.remove_version(args.version)
        return f"no longer offered: {target_path(args.version)}"
    if args.command == "sign":
        for role in ("root", "targets"):
            if role in args.role:
                repo.publish(role)
        repo.publish_online()
        return f"signed timestamp {repo.metadata('timestamp').signed.version}"
    repo.rotate(args.role)
    return f"{args.role}: new keys; root is now version {repo.root.version}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except (RepoError, OSError, ValueError) as exc:
        print(f"images.repo {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
