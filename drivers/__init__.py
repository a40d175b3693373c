"""Device families: one folder per family, found through `family(name)`."""

from drivers.base import Driver, DriverFamily, DriverState, Emit, OptionError, Reading
from drivers.registry import family, family_names

__all__ = [
    "Driver",
    "DriverFamily",
    "DriverState",
    "Emit",
    "OptionError",
    "Reading",
    "family",
    "family_names",
]
