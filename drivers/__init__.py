"""Device families: one folder per family, found through `family(name)`."""

from drivers.base import (
    Decoded,
    Driver,
    DriverFamily,
    DriverState,
    Emit,
    OptionError,
    Reading,
    Record,
)
from drivers.registry import family, family_names

__all__ = [
    "Decoded",
    "Driver",
    "DriverFamily",
    "DriverState",
    "Emit",
    "OptionError",
    "Reading",
    "Record",
    "family",
    "family_names",
]
