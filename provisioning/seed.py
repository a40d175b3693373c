"""`citygate provision seed SITE.toml --out DIR`: the cloud-init seed a new gateway boots with.

Runs on the technician's laptop or at the office, not on the gateway. It checks
the site file (`provisioning.site`), renders the seed (`provisioning.firstboot`)
and writes user-data, network-config and meta-data into DIR: a directory to
copy onto the card's boot partition, or the mounted boot partition itself.
`--deb FILE` copies the Debian package along, which the gateway installs at its
first boot. images/firstboot/README.md is the technician's guide.

`register_seed` adds the action to `citygate provision` (provisioning.cli).

Trust: the site file is checked before anything is written. user-data and
network-config hold secrets (token, Wi-Fi passphrase): they are written with
mode 0600 where the file system keeps modes, and nothing here prints them.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from provisioning.firstboot import SECRET_MODE, Seed, render_seed
from provisioning.pki import write_file_atomically
from provisioning.site import Cellular, read_site

_DEB_NAME = re.compile(r"citygate_[^_/]+_[a-z0-9]+\.deb")


class SeedError(Exception):
    """The seed cannot be written; the message says why and what to do."""


def register_seed(actions: Any) -> None:
    """Add `seed` to the actions of `citygate provision`."""
    seed: argparse.ArgumentParser = actions.add_parser(
        "seed",
        help="write the cloud-init seed (user-data, network-config, meta-data) for a new card",
        description="Check a site file and write the cloud-init seed a new gateway boots with: "
        "it sets the host name, clock and network, installs the citygate package from the "
        "card, writes the config, makes the key, enrolls with the token and starts the agent. "
        "Copy DIR's files onto the card's boot partition. See images/firstboot/README.md.",
    )
    seed.add_argument("site", type=Path, metavar="SITE.toml", help="the gateway's site file")
    seed.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where to write the seed files"
    )
    seed.add_argument(
        "--deb",
        type=Path,
        metavar="FILE",
        help="the citygate package (citygate_<version>_<arch>.deb) to copy into DIR as well",
    )
    seed.add_argument(
        "--force",
        action="store_true",
        help="replace seed files already in DIR (such as the image's own, on a boot partition)",
    )
    seed.set_defaults(handler=_cmd_seed)


def _write_secret_or_public(path: Path, text: str, mode: int) -> bool:
    """Write `text` with `mode`; False if the file system (FAT) could only make it public."""
    try:
        write_file_atomically(path, text.encode(), mode)
    except PermissionError:
        if mode & 0o044:
            raise
        write_file_atomically(path, text.encode(), mode | 0o044)
        return False
    return True


def write_seed(seed: Seed, out: Path, *, force: bool = False) -> list[Path]:
    """Write the seed's files into `out` (made if missing); the paths written, in order."""
    existing = [name for name in seed.files() if (out / name).exists()]
    if existing and not force:
        raise SeedError(
            f"{out} already holds {', '.join(existing)}: pass --force to replace them "
            "(on a boot partition they are the image's own seed)"
        )
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SeedError(f"cannot make {out}: {exc.strerror or exc}") from None
    written = []
    modes_kept = True
    for name, (text, mode) in seed.files().items():
        try:
            modes_kept &= _write_secret_or_public(out / name, text, mode)
        except OSError as exc:
            raise SeedError(f"cannot write {out / name}: {exc.strerror or exc}") from None
        written.append(out / name)
    if not modes_kept:
        print(
            f"note: {out} keeps no file modes (a FAT boot partition?): anyone who can read the "
            "card can read the token and the Wi-Fi passphrase until the gateway is enrolled",
            file=sys.stderr,
        )
    return written


def _copy_deb(deb: Path, out: Path) -> Path:
    if not _DEB_NAME.fullmatch(deb.name):
        raise SeedError(
            f"{deb.name} is not named like citygate_<version>_<arch>.deb: the gateway looks "
            "for that name on its boot partition"
        )
    if not deb.is_file():
        raise SeedError(f"no such package file {deb}")
    target = out / deb.name
    try:
        shutil.copyfile(deb, target)
    except OSError as exc:
        raise SeedError(f"cannot copy {deb} to {out}: {exc.strerror or exc}") from None
    return target


def _cmd_seed(args: argparse.Namespace) -> int:
    site = read_site(Path(args.site))  # ConfigError: printed by agent.cli, one line per problem
    seed = render_seed(site)
    out = Path(args.out)
    try:
        written = write_seed(seed, out, force=args.force)
        deb = _copy_deb(Path(args.deb), out) if args.deb is not None else None
    except SeedError as exc:
        print(f"citygate: {exc}", file=sys.stderr)
        return 1
    link = "cellular APN" if isinstance(site.network, Cellular) else "Wi-Fi"
    print(f"wrote the first-boot seed for gateway {site.gateway_id} ({link}) in {out}:")
    for path in written:
        secret = " (holds secrets: mode 0600)" if seed.files()[path.name][1] == SECRET_MODE else ""
        print(f"  {path.name}{secret}")
    if deb is not None:
        print(f"  {deb.name}")
        print("next: copy these files onto the card's boot partition")
    else:
        print(
            "next: copy these files and the citygate_<version>_<arch>.deb built for the card's "
            "OS onto the card's boot partition (or pass --deb FILE)"
        )
    return 0
