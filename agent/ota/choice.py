"""Which bundle to install: the citygate targets, read from signed metadata, and the choice.

Pure decisions, no I/O. `parse_candidates` reads the custom data of each target (under
`custom.citygate`: version, platform, python, hardware, channel, min_version) and names
every target that is not a well-formed citygate bundle instead of failing on it. `choose`
picks the highest version this gateway may install: newer than the installed one, built for
its platform and python, listing its hardware (or "*"), on its channel, accepting the
installed version as a starting point (min_version), and not refused on this gateway before.

Trusts: the `TargetFile`s it is given were verified by agent.ota.trust (signed by the
targets key, bound to one repository state by snapshot and timestamp), so their custom data
is the publisher's word; it still checks the shape of that data, because a signed but
malformed target must be skipped, not crash the update. It does not trust a candidate's
bytes: agent.ota.trust downloads them and checks them against the signed length and hashes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from packaging.version import InvalidVersion, Version
from tuf.api._payload import TargetFile  # tuf.api.metadata re-exports it implicitly

__all__ = ["PRODUCT", "Candidate", "choose", "parse_candidates"]

PRODUCT: Final = "citygate"


@dataclass(frozen=True)
class Candidate:
    """A bundle the targets role offers, with its signed custom data."""

    name: str
    version: str
    platform: str
    python: str
    hardware: tuple[str, ...]
    channel: str
    min_version: str
    length: int
    target: TargetFile = field(compare=False, repr=False)


def parse_candidates(targets: Mapping[str, TargetFile]) -> tuple[list[Candidate], list[str]]:
    """The citygate bundles among `targets`, and one line per target that is not one."""
    found: list[Candidate] = []
    skipped: list[str] = []
    for name, target in sorted(targets.items()):
        try:
            found.append(_candidate(name, target))
        except ValueError as exc:
            skipped.append(f"{name}: {exc}")
    return found, skipped


def _candidate(name: str, target: TargetFile) -> Candidate:
    custom = target.custom
    data = custom.get(PRODUCT) if isinstance(custom, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f'no "custom": {{"{PRODUCT}": {{...}}}} data')
    texts = {}
    for key in ("version", "platform", "python", "channel", "min_version"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"custom {key} missing or not a string")
        texts[key] = value
    hardware = data.get("hardware")
    if (
        not isinstance(hardware, list)
        or not hardware
        or not all(isinstance(h, str) for h in hardware)
    ):
        raise ValueError("custom hardware must be a non-empty list of names")
    try:
        Version(texts["version"])
        Version(texts["min_version"])
    except InvalidVersion as exc:
        raise ValueError(f"custom version: {exc}") from None
    if name != f"{PRODUCT}-{texts['version']}.bundle":
        raise ValueError(f"name does not match custom version {texts['version']}")
    return Candidate(
        name=name,
        version=texts["version"],
        platform=texts["platform"],
        python=texts["python"],
        hardware=tuple(hardware),
        channel=texts["channel"],
        min_version=texts["min_version"],
        length=target.length,
        target=target,
    )


def choose(
    candidates: Iterable[Candidate],
    installed: str,
    *,
    platform: str,
    python: str,
    hardware: str,
    channel: str,
    refused: frozenset[str] = frozenset(),
) -> tuple[Candidate | None, list[str]]:
    """The highest version this gateway may install, and one line per candidate skipped.

    A candidate fits when it is newer than `installed`, built for this platform and python,
    lists this hardware (or "*"), is on this channel, accepts `installed` as a starting
    point (min_version <= installed) and is not in `refused`.
    """
    current = Version(installed)
    refused_versions = {_version_or_none(v) for v in refused} - {None}
    fitting: list[tuple[Version, Candidate]] = []
    skipped: list[str] = []
    for cand in candidates:
        version = Version(cand.version)
        reason = _unfit(
            cand,
            version,
            current,
            platform=platform,
            python=python,
            hardware=hardware,
            channel=channel,
        )
        if reason is None and version in refused_versions:
            reason = "refused on this gateway (rolled back or failed before)"
        if reason is None:
            fitting.append((version, cand))
        else:
            skipped.append(f"{cand.name}: {reason}")
    if not fitting:
        return None, skipped
    fitting.sort(key=lambda pair: pair[0])
    skipped.extend(f"{c.name}: {fitting[-1][1].version} is newer" for _, c in fitting[:-1])
    return fitting[-1][1], skipped


def _unfit(
    cand: Candidate,
    version: Version,
    current: Version,
    *,
    platform: str,
    python: str,
    hardware: str,
    channel: str,
) -> str | None:
    checks = (
        (version <= current, f"not newer than installed {current}"),
        (cand.platform != platform, f"platform {cand.platform}, this gateway is {platform}"),
        (cand.python != python, f"python {cand.python}, this gateway runs {python}"),
        (
            "*" not in cand.hardware and hardware not in cand.hardware,
            f"hardware {','.join(cand.hardware)}, this gateway is {hardware}",
        ),
        (cand.channel != channel, f"channel {cand.channel}, this gateway follows {channel}"),
        (Version(cand.min_version) > current, f"needs at least {cand.min_version} installed"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _version_or_none(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None
