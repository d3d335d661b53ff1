"""Exception hierarchy: every error cwtflow raises on purpose derives from `CWTFlowError`.

One class per kind of problem:

- `InputError` (also a `ValueError`): input data are unusable (shape/WCS mismatch, NaN,
  negative or overflowing pixels, a corrupt file);
- `ParameterError` (an `InputError`): a parameter has the wrong type or a value outside its
  documented range;
- `ResourceError` (an `InputError`): the run asked for would not fit (kernel larger than the
  limits, working set beyond the memory available, too many tiles);
- `NotFoundError` (also a `KeyError`): a lookup by name or number that does not exist (an
  image name, an iteration of a store), so ``except KeyError`` keeps catching it;
- `StoreError`: a result store or output path cannot be written, read or resumed;
- `ClusterError`: the dask cluster of a run failed.
"""

from __future__ import annotations

__all__ = [
    "CWTFlowError",
    "ClusterError",
    "InputError",
    "NotFoundError",
    "ParameterError",
    "ResourceError",
    "StoreError",
]


class CWTFlowError(Exception):
    """Root of all errors raised by cwtflow on purpose."""


class InputError(CWTFlowError, ValueError):
    """Input maps or parameters are unusable (shape/WCS mismatch, NaN, negative background...)."""


class ParameterError(InputError):
    """A parameter has the wrong type or a value outside its documented range."""


class ResourceError(InputError):
    """The run asked for is too large to run: kernels, memory or number of tiles."""


class NotFoundError(CWTFlowError, KeyError):
    """A name or number looked up does not exist (also a `KeyError`)."""

    # KeyError quotes its message (it shows a key); this one is a sentence
    __str__ = BaseException.__str__


class StoreError(CWTFlowError):
    """A result store or output path cannot be written, read or resumed."""


class ClusterError(CWTFlowError):
    """The dask cluster of a run failed: unreachable, lost, without workers, or killing tasks."""
