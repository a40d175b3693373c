"""The Debian package of the agent: `build_deb` and the errors it raises."""

from images.deb.build import Package, build_deb, debian_version
from images.deb.release import BuildError

__all__ = ["BuildError", "Package", "build_deb", "debian_version"]
