"""Test helpers for the TUF side of OTA: real repositories made by images.repo, a gateway client.

`RepoRig` is a repository on disk (images.repo.Repository) plus what a gateway needs to
check it (the shipped 1.root.json, a metadata cache). `python -m tests.ota_tuf` runs one
refresh in a process of its own and prints the outcome as JSON: tests run it under
libfaketime (a wrong clock) and across restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.ota.bundle import platform_tag, python_tag
from agent.ota.fetch import fetcher_for
from agent.ota.trust import TrustError, UpdateRepository
from images.repo import BundleInfo, Repository

FAKETIME_LIB: Final = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
ROOT: Final = Path(__file__).resolve().parent.parent


@dataclass
class RepoRig:
    """A repository directory, its tooling object and the gateway's view of it."""

    repo: Repository
    shipped_root: Path
    cache: Path

    @classmethod
    def create(cls, tmp: Path) -> RepoRig:
        """A fresh repository under tmp/repo; the gateway ships its 1.root.json."""
        repo = Repository.create(tmp / "repo")
        shipped = tmp / "update-root.json"
        shipped.write_bytes((repo.metadata_dir / "1.root.json").read_bytes())
        return cls(repo, shipped, tmp / "gateway" / "metadata")

    def add(self, tmp: Path, version: str, **custom: Any) -> Path:
        """Offer a small fake bundle of `version` (any bytes; custom data from keywords)."""
        bundle = tmp / f"src-{version}.bundle"
        bundle.write_bytes(f"citygate {version} ".encode() * 200)
        info = BundleInfo(
            version, custom.pop("platform", platform_tag()), custom.pop("python", python_tag())
        )
        self.repo.add_bundle(bundle, info, **custom)
        return bundle

    def client(self) -> UpdateRepository:
        """A gateway-side client over the repository directory (a new one = a new check)."""
        fetcher, metadata_url, targets_url = fetcher_for(str(self.repo.path))
        return UpdateRepository(self.cache, self.shipped_root, fetcher, metadata_url, targets_url)

    def subprocess_refresh(self, faketime: str | None = None) -> dict[str, Any]:
        """Refresh in a separate process (optionally under libfaketime); its JSON outcome."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", "FAKETIME"))}
        if faketime is not None:
            env |= {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": faketime}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.ota_tuf",
                str(self.repo.path),
                str(self.shipped_root),
                str(self.cache),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        outcome: dict[str, Any] = json.loads(proc.stdout)
        return outcome


def _main() -> int:
    parser = argparse.ArgumentParser(description="refresh once, print the outcome as JSON")
    parser.add_argument("repo")
    parser.add_argument("shipped_root", type=Path)
    parser.add_argument("cache", type=Path)
    args = parser.parse_args()
    fetcher, metadata_url, targets_url = fetcher_for(args.repo)
    client = UpdateRepository(args.cache, args.shipped_root, fetcher, metadata_url, targets_url)
    try:
        client.refresh()
        outcome = {"ok": True, "versions": sorted(c.version for c in client.candidates())}
    except TrustError as exc:
        outcome = {"ok": False, "error": str(exc), "retryable": exc.retryable}
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
