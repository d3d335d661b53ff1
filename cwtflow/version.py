"""The installed cwtflow version, at the bottom of the package so that every layer (the files it
writes record it) can import it without importing the package face."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cwtflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
