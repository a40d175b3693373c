"""The OTA flow's work on disk, under state_dir/ota: metadata, downloads, unpacked bundles.

    <state_dir>/ota/metadata/    TUF's metadata cache (agent.ota.trust keeps it)
    <state_dir>/ota/downloads/   bundles: `<sha256>.<name>` once verified, partial before
    <state_dir>/ota/unpack/      the bundle being installed, unpacked

Each helper is one step of agent.ota.flow and idempotent, so a resumed flow simply calls it
again: `open_repository` (the fetcher for the repository and the TUF client over it),
`download` (a verified bundle is reused, a partial one resumed), `install` (unpack, check,
hand to agent.ota.release, which reuses a complete release), `cleanup` (downloads and
unpacked bundles go once a run has ended).

Trusts: a file named `<sha256>.<name>` in downloads/ was verified (agent.ota.trust renames
a download there only after its hashes matched); the unpacked bundle because
agent.ota.bundle checked its members against its manifest, and the manifest only when it
names the version the signed target was chosen for.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.ota.bundle import BundleError, Manifest, unpack
from agent.ota.fetch import DownloadLimits, fetcher_for
from agent.ota.release import Releases
from agent.ota.terms import OtaSettings
from agent.ota.trust import Candidate, UpdateRepository

__all__ = ["cleanup", "download", "install", "open_repository"]


def open_repository(
    ota_dir: Path,
    settings: OtaSettings,
    repo: str,
    *,
    client_cert: Path | None,
    client_key: Path | None,
) -> UpdateRepository:
    """The TUF client for `repo`, its metadata cached under `ota_dir`/metadata."""
    fetcher, metadata_url, targets_url = fetcher_for(
        repo,
        ca_file=settings.ca,
        client_cert=client_cert,
        client_key=client_key,
    )
    metadata = ota_dir / "metadata"
    metadata.mkdir(parents=True, exist_ok=True)
    return UpdateRepository(metadata, settings.trusted_root, fetcher, metadata_url, targets_url)


def download(ota_dir: Path, trust: UpdateRepository, cand: Candidate, *, timeout_s: float) -> Path:
    """The verified bundle of `cand` in `ota_dir`/downloads (downloaded unless already there)."""
    downloads = ota_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    digest = cand.target.hashes.get("sha256", "nohash")
    dest = downloads / f"{digest}.{Path(cand.name).name}"
    if dest.exists():  # only ever renamed there after its hashes were verified
        return dest
    limits = DownloadLimits(timeout_s=timeout_s)
    return trust.download(cand, downloads, dest, limits)


def install(ota_dir: Path, releases: Releases, bundle: Path, version: str) -> Manifest:
    """Unpack `bundle` under `ota_dir`/unpack and install it as release `version`."""
    unpack_root = ota_dir / "unpack"
    shutil.rmtree(unpack_root, ignore_errors=True)  # leftovers of an interrupted run
    unpack_root.mkdir(parents=True)
    unpacked = unpack_root / version
    manifest = unpack(bundle, unpacked)
    if manifest.name != "citygate" or manifest.version != version:
        raise BundleError(
            f"manifest says {manifest.name} {manifest.version}; the signed target is "
            f"citygate {version}"
        )
    releases.install(unpacked, manifest)
    shutil.rmtree(unpack_root, ignore_errors=True)
    return manifest


def cleanup(ota_dir: Path) -> None:
    """Remove the downloads and unpacked bundles of a run that has ended."""
    for name in ("downloads", "unpack"):
        shutil.rmtree(ota_dir / name, ignore_errors=True)
