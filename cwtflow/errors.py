"""Exception hierarchy: every error cwtflow raises on purpose derives from `CWTFlowError`."""

from __future__ import annotations

__all__ = ["CWTFlowError", "ClusterError", "InputError", "StoreError"]


class CWTFlowError(Exception):
    """Root of all errors raised by cwtflow on purpose."""


class InputError(CWTFlowError, ValueError):
    """Input maps or parameters are unusable (shape/WCS mismatch, NaN, negative background...)."""


class StoreError(CWTFlowError):
    """A result store or output path cannot be written, read or resumed."""


class ClusterError(CWTFlowError):
    """The dask cluster of a run failed: unreachable, lost, without workers, or killing tasks."""
