"""The gateway installs only what the update repository signed, for it, and newer.

Every repository here is made by images.repo on disk and read through the real
LocalFetcher; attacks are crafted with the same tooling (the attacker holds the keys
the scenario says it holds) and served from the repository directory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api._payload import MetaFile

from agent.ota.bundle import platform_tag, python_tag
from agent.ota.fetch import DownloadLimits, fetcher_for
from agent.ota.trust import Candidate, TrustError, UpdateRepository
from tests.ota_fixtures import make_bundle, make_wheel
from tests.ota_tuf import FAKETIME_LIB, ROOT, RepoRig

LIMITS = DownloadLimits(timeout_s=30, stall_s=5, attempts=2, backoff_initial_s=0.01)


@pytest.fixture
def rig(tmp_path: Path) -> RepoRig:
    rig = RepoRig.create(tmp_path)
    rig.add(tmp_path, "0.2.0")
    return rig


def pick(
    client: UpdateRepository,
    installed: str,
    *,
    hardware: str = "generic",
    channel: str = "stable",
    refused: frozenset[str] = frozenset(),
) -> tuple[Candidate | None, list[str]]:
    """What this machine (platform, python) as a gateway of `hardware` would choose."""
    return client.choose(
        installed,
        platform=platform_tag(),
        python=python_tag(),
        hardware=hardware,
        channel=channel,
        refused=refused,
    )


def version_of(choice: tuple[Candidate | None, list[str]]) -> str | None:
    return None if choice[0] is None else choice[0].version


def refresh_error(client: UpdateRepository) -> TrustError:
    with pytest.raises(TrustError) as caught:
        client.refresh()
    return caught.value


# -- the repository tooling ------------------------------------------------------------------


def test_repo_cli_makes_threshold_keys_private_and_consistent_snapshots(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, name="citygate", version="0.3.0")
    pip = make_wheel(tmp_path, name="pip", version="23.2.1", scripts={})
    bundle = make_bundle(tmp_path, "0.3.0", [wheel], installer_wheel=pip)
    repo = tmp_path / "repo"

    def cli(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "images.repo", *args],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )

    cli("init", str(repo))
    cli("add", str(repo), str(bundle), "--hardware", "rpi4", "cm4", "--min-version", "0.1.0")

    root = json.loads((repo / "metadata" / "1.root.json").read_text())["signed"]
    assert root["consistent_snapshot"] is True
    roles = root["roles"]
    assert (len(roles["root"]["keyids"]), roles["root"]["threshold"]) == (3, 2)
    assert (len(roles["targets"]["keyids"]), roles["targets"]["threshold"]) == (2, 1)
    for key in (repo / "keys").rglob("*.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((repo / "keys").stat().st_mode) == 0o700
    targets = json.loads((repo / "metadata" / "2.targets.json").read_text())["signed"]
    entry = targets["targets"]["citygate-0.3.0.bundle"]
    assert entry["custom"] == {
        "citygate": {
            "version": "0.3.0",
            "platform": platform_tag(),
            "python": python_tag(),
            "hardware": ["cm4", "rpi4"],
            "channel": "stable",
            "min_version": "0.1.0",
        }
    }
    stored = repo / "targets" / f"{entry['hashes']['sha256']}.citygate-0.3.0.bundle"
    assert stored.read_bytes() == bundle.read_bytes()
    expires = {
        role: datetime.fromisoformat(
            json.loads(next((repo / "metadata").glob(f"*{role}.json")).read_text())["signed"][
                "expires"
            ]
        )
        for role in ("root", "targets", "snapshot", "timestamp")
    }
    now = datetime.now(UTC)
    for role, days in {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}.items():
        assert abs(expires[role] - now - timedelta(days=days)) < timedelta(minutes=5), role


def test_repo_cli_signs_with_offline_keys_kept_apart(tmp_path: Path) -> None:
    repo, offline, online = tmp_path / "repo", tmp_path / "offline", tmp_path / "online"
    bundle = tmp_path / "b.bundle"
    bundle.write_bytes(b"bundle bytes")
    flags = ["--version", "0.2.0", "--platform", platform_tag(), "--python", python_tag()]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "images.repo", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert cli("init", str(repo), "--keys", str(offline)).returncode == 0
    online.mkdir(mode=0o700)
    for role in ("snapshot", "timestamp"):
        (offline / role).rename(online / role)
    assert cli("sign", str(repo), "--keys", str(online)).returncode == 0
    refused = cli("add", str(repo), str(bundle), *flags, "--keys", str(online))
    assert refused.returncode == 1
    assert "targets: 0 of its keys found" in refused.stderr
    keys = ["--keys", str(online), "--keys", str(offline)]
    assert cli("add", str(repo), str(bundle), *flags, *keys).returncode == 0
    assert cli("rotate", str(repo), "timestamp", *keys).returncode == 0
    assert len(list((online / "timestamp").glob("*.pem"))) == 1
    assert len(list((online / "timestamp" / "retired").glob("*.pem"))) == 1

    shipped = tmp_path / "update-root.json"
    shipped.write_bytes((repo / "metadata" / "1.root.json").read_bytes())
    fetcher, metadata_url, targets_url = fetcher_for(str(repo))
    client = UpdateRepository(tmp_path / "cache", shipped, fetcher, metadata_url, targets_url)
    assert [c.version for c in client.candidates()] == ["0.2.0"]


def test_repo_refuses_a_root_threshold_of_one(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "images.repo",
            "init",
            str(tmp_path / "r"),
            "--root-keys",
            "1",
            "--root-threshold",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "root: threshold must be at least 2" in proc.stderr


# -- what a gateway accepts -------------------------------------------------------------------


def test_gateway_verifies_downloads_and_chooses_the_offered_bundle(
    rig: RepoRig, tmp_path: Path
) -> None:
    source = rig.add(tmp_path, "0.3.0")
    client = rig.client()
    client.refresh()
    cand, _ = pick(client, "0.1.0")
    assert cand is not None
    assert cand.version == "0.3.0"
    dest = client.download(cand, tmp_path / "dl", tmp_path / "verified.bundle", LIMITS)
    assert dest.read_bytes() == source.read_bytes()
    assert not (tmp_path / "dl" / f"{cand.name}.part").exists()


def test_tampered_bundle_bytes_are_rejected_and_removed(rig: RepoRig, tmp_path: Path) -> None:
    client = rig.client()
    client.refresh()
    cand, _ = pick(client, "0.1.0")
    assert cand is not None
    stored = next(rig.repo.targets_dir.glob("*.citygate-0.2.0.bundle"))
    data = bytearray(stored.read_bytes())
    data[10] ^= 0xFF  # same length, one byte changed on the mirror
    stored.write_bytes(bytes(data))
    with pytest.raises(TrustError, match="do not match its signed hashes") as caught:
        client.download(cand, tmp_path / "dl", tmp_path / "verified.bundle", LIMITS)
    assert not caught.value.retryable
    assert not (tmp_path / "verified.bundle").exists()
    assert not (tmp_path / "dl" / f"{cand.name}.part").exists()


def test_targets_signed_by_an_unknown_key_are_rejected(rig: RepoRig, tmp_path: Path) -> None:
    rig.client().refresh()
    md = rig.repo.metadata("targets")
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519())  # the attacker's own key, not in root
    rig.repo.write("targets", md)
    rig.repo.publish_online()  # even with the online keys (snapshot, timestamp) on its side
    error = refresh_error(rig.client())
    assert str(error).startswith("targets: ")
    assert "not signed by enough trusted keys" in str(error)
    assert not error.retryable


def test_root_signed_below_threshold_is_rejected(rig: RepoRig) -> None:
    md = rig.repo.metadata("root")
    md.signed.version += 1
    md.signed.roles["targets"].threshold = 1
    one_key = rig.repo.signers("root")[0]
    md.sign(one_key)  # 1 of the 2 needed out of 3
    rig.repo.write("root", md)
    error = refresh_error(rig.client())
    assert str(error).startswith("root: ")
    assert "not signed by enough trusted keys" in str(error)
    assert os.readlink(rig.cache / "root.json") == "root_history/1.root.json"


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_replayed_older_metadata_is_rejected(rig: RepoRig, tmp_path: Path, role: str) -> None:
    repo = rig.repo
    old = {
        r: MetaFile.from_data(
            repo.metadata(r).signed.version,
            (repo.metadata_dir / f"{repo.metadata(r).signed.version}.{r}.json").read_bytes(),
            ["sha256"],
        )
        for r in ("snapshot", "targets")
    }
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    rig.add(tmp_path, "0.3.0")
    rig.client().refresh()  # the gateway has seen the newer state

    if role == "timestamp":  # a mirror replays the old, still valid timestamp file
        (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    elif role == "snapshot":  # the timestamp key is stolen: it points back to an old snapshot
        repo.metadata("timestamp").signed.snapshot_meta = old["snapshot"]
        md = repo.metadata("timestamp")
        md.signed.version += 1
        md.sign(repo.signers("timestamp")[0])
        repo.write("timestamp", md)
    else:  # both online keys are stolen: a new snapshot lists the old targets
        md = repo.metadata("snapshot")
        md.signed.version += 1
        md.signed.meta["targets.json"] = old["targets"]
        md.sign(repo.signers("snapshot")[0])
        repo.write("snapshot", md)
        ts = repo.metadata("timestamp")
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile.from_data(
            md.signed.version,
            (repo.metadata_dir / f"{md.signed.version}.snapshot.json").read_bytes(),
            ["sha256"],
        )
        ts.sign(repo.signers("timestamp")[0])
        repo.write("timestamp", ts)

    error = refresh_error(rig.client())
    assert "older than what this gateway already trusts" in str(error)
    assert not error.retryable


def test_targets_of_another_snapshot_are_rejected(rig: RepoRig, tmp_path: Path) -> None:
    repo = rig.repo
    older_targets = (repo.metadata_dir / "2.targets.json").read_bytes()
    rig.add(tmp_path, "0.3.0")  # targets 3, listed by the newest snapshot
    (repo.metadata_dir / "3.targets.json").write_bytes(older_targets)  # mix: old targets file
    error = refresh_error(rig.client())
    assert str(error).startswith("targets: ")
    assert "mix-and-match" in str(error)


def test_expired_timestamp_is_rejected_as_a_freeze(rig: RepoRig) -> None:
    rig.repo.publish("timestamp", expires=datetime.now(UTC) - timedelta(hours=1))
    error = refresh_error(rig.client())
    assert str(error).startswith("timestamp: ")
    assert "has expired" in str(error)
    subprocess.run(
        [sys.executable, "-m", "images.repo", "sign", str(rig.repo.path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    rig.client().refresh()  # the daily re-signing ends the freeze


@pytest.mark.skipif(not FAKETIME_LIB.exists(), reason="libfaketime is not installed")
def test_a_clock_in_the_future_sees_the_metadata_expired(rig: RepoRig) -> None:
    assert rig.subprocess_refresh()["ok"]
    outcome = rig.subprocess_refresh(faketime="@2030-01-01 00:00:00")
    assert not outcome["ok"]
    assert "has expired" in outcome["error"]


@pytest.mark.skipif(not FAKETIME_LIB.exists(), reason="libfaketime is not installed")
def test_a_clock_before_the_build_is_refused(rig: RepoRig) -> None:
    rig.repo.publish("timestamp", expires=datetime.now(UTC) - timedelta(hours=1))  # frozen
    outcome = rig.subprocess_refresh(faketime="@1970-01-02 00:00:00")
    assert not outcome["ok"]
    assert "waiting for a trusted clock" in outcome["error"]
    assert outcome["retryable"]


@pytest.mark.skipif(not FAKETIME_LIB.exists(), reason="libfaketime is not installed")
def test_a_clock_in_the_past_still_needs_trusted_signatures(rig: RepoRig) -> None:
    md = rig.repo.metadata("targets")
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519())
    rig.repo.write("targets", md)
    rig.repo.publish_online()
    outcome = rig.subprocess_refresh(faketime="@2026-01-15 00:00:00")
    assert not outcome["ok"]
    assert "not signed by enough trusted keys" in outcome["error"]


# -- choosing ---------------------------------------------------------------------------------


def test_choose_refuses_downgrades_and_bundles_for_other_gateways(
    tmp_path: Path,
) -> None:
    rig = RepoRig.create(tmp_path)
    rig.add(tmp_path, "0.1.0")
    rig.add(tmp_path, "0.2.0")
    rig.add(tmp_path, "0.3.0", min_version="0.2.0")
    rig.add(tmp_path, "0.4.0", hardware=["rpi4"])
    rig.add(tmp_path, "0.5.0", channel="beta")
    rig.add(tmp_path, "0.6.0", platform="linux-riscv64")
    rig.add(tmp_path, "0.7.0", python="3.99")
    client = rig.client()
    client.refresh()

    cand, skipped = pick(client, "0.1.0")
    assert cand is not None
    assert cand.version == "0.2.0"
    text = "\n".join(skipped)
    for expected in (
        "0.1.0.bundle: not newer than installed",
        "0.3.0.bundle: needs at least 0.2.0",
        "0.4.0.bundle: hardware rpi4",
        "0.5.0.bundle: channel beta",
        "0.6.0.bundle: platform linux-riscv64",
        "0.7.0.bundle: python 3.99",
    ):
        assert expected in text

    assert version_of(pick(client, "0.2.0")) == "0.3.0"
    assert version_of(pick(client, "0.1.0", hardware="rpi4")) == "0.4.0"
    assert version_of(pick(client, "0.1.0", channel="beta")) == "0.5.0"
    assert version_of(pick(client, "0.1.0", refused=frozenset({"0.2"}))) is None
    # the newest signed bundle is a downgrade for this gateway: nothing to do
    cand, skipped = pick(client, "0.9.0")
    assert cand is None
    assert "citygate-0.2.0.bundle: not newer than installed 0.9.0" in skipped


def test_targets_without_valid_custom_data_are_not_candidates(rig: RepoRig, tmp_path: Path) -> None:
    rig.add(tmp_path, "0.3.0")
    targets = rig.repo.metadata("targets").signed.targets
    targets["citygate-0.3.0.bundle"].unrecognized_fields["custom"]["citygate"]["version"] = "0.9"
    rig.repo.publish("targets")
    rig.repo.publish_online()
    client = rig.client()
    assert [c.version for c in client.candidates()] == ["0.2.0"]
    cand, skipped = pick(client, "0.1.0")
    assert isinstance(cand, Candidate)
    assert cand.version == "0.2.0"
    assert "citygate-0.3.0.bundle: name does not match custom version 0.9" in skipped


# -- keys change ------------------------------------------------------------------------------


def test_gateway_follows_a_root_key_rotation(rig: RepoRig, tmp_path: Path) -> None:
    rig.client().refresh()
    rig.repo.rotate("root")
    rig.add(tmp_path, "0.3.0")
    client = rig.client()
    client.refresh()
    assert os.readlink(rig.cache / "root.json") == "root_history/2.root.json"
    assert [c.version for c in client.candidates()] == ["0.2.0", "0.3.0"]


def test_new_root_signed_only_by_new_keys_is_rejected(rig: RepoRig) -> None:
    md = rig.repo.metadata("root")
    for keyid in list(md.signed.roles["root"].keyids):
        md.signed.revoke_key(keyid, "root")
    attacker = [CryptoSigner.generate_ed25519() for _ in range(3)]
    for signer in attacker:
        md.signed.add_key(signer.public_key, "root")
    md.signed.version += 1
    md.signatures.clear()
    for signer in attacker:
        md.sign(signer, append=True)
    rig.repo.write("root", md)
    error = refresh_error(rig.client())
    assert str(error).startswith("root: ")


def test_revoked_timestamp_key_is_rejected_after_the_root_update(rig: RepoRig) -> None:
    repo = rig.repo
    rig.client().refresh()
    old_key = repo.signers("timestamp")[0]
    repo.rotate("timestamp")  # root 2 names a new timestamp key
    assert old_key.public_key.keyid not in repo.root.roles["timestamp"].keyids
    legit = (repo.metadata_dir / "timestamp.json").read_bytes()
    forged = repo.metadata("timestamp")
    forged.signed.version += 100
    forged.sign(old_key)  # the attacker stole the old online key
    repo.write("timestamp", forged)

    error = refresh_error(rig.client())
    assert str(error).startswith("timestamp: ")
    assert "not signed by enough trusted keys" in str(error)
    assert os.readlink(rig.cache / "root.json") == "root_history/2.root.json"
    (repo.metadata_dir / "timestamp.json").write_bytes(legit)
    rig.client().refresh()


# -- the cache --------------------------------------------------------------------------------


def test_cached_trust_survives_a_restart_and_replaces_the_shipped_root(
    rig: RepoRig, tmp_path: Path
) -> None:
    old_timestamp = (rig.repo.metadata_dir / "timestamp.json").read_bytes()
    rig.add(tmp_path, "0.3.0")
    assert rig.subprocess_refresh() == {"ok": True, "versions": ["0.2.0", "0.3.0"]}
    rig.shipped_root.write_text("not json: the cache must be the anchor now")
    assert rig.subprocess_refresh()["ok"]
    (rig.repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    outcome = rig.subprocess_refresh()  # a new process still knows the newer timestamp
    assert not outcome["ok"]
    assert "older than what this gateway already trusts" in outcome["error"]


def test_shipped_root_is_used_only_without_a_cache(rig: RepoRig) -> None:
    rig.shipped_root.write_text("{}")
    error = refresh_error(rig.client())
    assert str(rig.shipped_root) in str(error)


def test_metadata_is_fsynced_before_it_is_trusted_on_disk(
    rig: RepoRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    rig.client().refresh()
    for name in ("timestamp.json", "snapshot.json", "targets.json", "root_history/1.root.json"):
        path = rig.cache / name
        assert path.exists()
        temporary = f".{path.name}."  # agent.durable's temporary file beside the target
        assert any(
            Path(s).parent == path.parent and Path(s).name.startswith(temporary) for s in synced
        ), name
    assert str(rig.cache) in synced  # the directory entry (rename) too


def test_oversized_metadata_is_not_downloaded(rig: RepoRig) -> None:
    fetcher, metadata_url, targets_url = fetcher_for(str(rig.repo.path))
    small = UpdateRepository(
        rig.cache, rig.shipped_root, fetcher, metadata_url, targets_url, max_metadata_bytes=300
    )
    error = refresh_error(small)
    assert error.retryable
    assert "could not download" in str(error)
