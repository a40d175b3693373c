"""The OTA flow's terms with its callers: what it reads and what it answers.

What it reads: `OtaSettings`, the `[ota]` config table as the flow sees it
(agent.config.OtaConfig provides it), and `clock_trusted_for`, agent.clock's rule for
when this gateway's wall clock may be believed. What it answers: an `Outcome` per run,
whose `result` is one of the result names below (printed by `citygate ota`, acted on by
the agent: `restart` asks it to exit 75 so systemd starts the release `current` now
points at).

Trusts: the config (agent.config validated it) and the gateway certificate file for the
start of its validity, only as a floor for the clock: a certificate that cannot be read
falls back to the build date. No I/O beyond that one read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from agent.clock import WallClock, trust_floor

if TYPE_CHECKING:
    from agent.config import Config

__all__ = [
    "FAILED",
    "IN_TRIAL",
    "REJECTED",
    "RETRY",
    "SELFTEST_FAILED",
    "SWITCHED",
    "UP_TO_DATE",
    "WAITING_CLOCK",
    "OtaSettings",
    "Outcome",
    "clock_trusted_for",
]

# what `Outcome.result` says
UP_TO_DATE: Final = "up_to_date"
SWITCHED: Final = "switched"
IN_TRIAL: Final = "in_trial"
WAITING_CLOCK: Final = "waiting_clock"
FAILED: Final = "failed"
RETRY: Final = "retry"
REJECTED: Final = "rejected"
SELFTEST_FAILED: Final = "selftest_failed"
_OK_RESULTS: Final = frozenset({UP_TO_DATE, SWITCHED, IN_TRIAL})


class OtaSettings(Protocol):
    """What the flow reads from the `[ota]` config table (agent.config.OtaConfig)."""

    @property
    def repo(self) -> str: ...
    @property
    def root(self) -> Path: ...
    @property
    def trusted_root(self) -> Path: ...
    @property
    def channel(self) -> str: ...
    @property
    def hardware(self) -> str: ...
    @property
    def trial_deadline_s(self) -> float: ...
    @property
    def max_trial_starts(self) -> int: ...
    @property
    def max_bundle_bytes(self) -> int: ...
    @property
    def download_timeout_s(self) -> float: ...
    @property
    def ca(self) -> Path | None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run did: `result` is one of the module's result names; `restart` asks the
    running agent to exit 75 so systemd starts the release `current` now points at."""

    result: str
    version: str | None
    detail: str
    restart: bool = False

    @property
    def ok(self) -> bool:
        return self.result in _OK_RESULTS


def clock_trusted_for(config: Config) -> Callable[[], bool]:
    """agent.clock's rule for this gateway: the floor is the build date, or the start of
    the gateway certificate's validity when the certificate can be read."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(config.identity.cert.read_bytes())
        floor = trust_floor(cert.not_valid_before_utc)
    except (OSError, ValueError):
        floor = trust_floor()
    return WallClock(floor).trusted
