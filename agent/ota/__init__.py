"""Signed over-the-air updates for citygate (docs/adr/0007-ota-updates.md).

TUF decides what to install (agent.ota.trust over agent.ota.fetch), an A/B release
install with a health-gated commit decides whether it stays (agent.ota.release,
driven by the persisted flow in agent.ota.flow). The public names are the flow's;
each side's error type is public in its own module (BundleError, FetchError,
TrustError, ReleaseError).

The names are imported lazily, so the bundle tooling (images.bundle) and its tests
can use agent.ota.bundle without loading the TUF client and the release code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.ota.flow import OtaError, OtaManager, Outcome, manager_for

__all__ = ["OtaError", "OtaManager", "Outcome", "manager_for"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from agent.ota import flow

        return getattr(flow, name)
    raise AttributeError(f"module 'agent.ota' has no attribute {name!r}")
