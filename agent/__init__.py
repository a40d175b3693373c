"""citygate agent: the daemon and its command line."""

from importlib import metadata


def version() -> str:
    """The installed distribution's version ("0+unknown" when run from a bare source tree)."""
    try:
        return metadata.version("citygate")
    except metadata.PackageNotFoundError:
        return "0+unknown"
