"""The lazy reader of a run's zarr store (`open_history`, `History`, `read_result`).

Only complete groups count (`cwtflow.store`); states are Datasets of dask arrays read from the
store, computed only when asked. Opening checks each group's manifest for presence (no chunk
is read) and pins it: chunks are read through `cwtflow.store_integrity.PinnedStore`, so a
damaged chunk, or a group the writer pruned or replaced after the opening, is a `StoreError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.table import Table
from astropy.wcs import WCS

from .analysis import difference as _difference
from .analysis import images as _images
from .errors import NotFoundError, ParameterError, StoreError
from .iteration import IterationInfo, iteration_table, run_summary
from .kernels import CWTKernels
from .maps import wcs_from_attrs
from .state import CUBES, IMAGES, STATE_VARS, variable_attrs
from .store import (
    INPUT_VARS,
    ITERATION_VARS,
    check_dataset,
    check_root,
    complete_iterations,
    compose_state,
    expected_variables,
    group_name,
    is_complete,
    open_group,
    table_infos,
)
from .store_integrity import check_group, check_root_digest, group_digest, open_pinned

#: Attempts at opening while a writer prunes the groups being opened.
_ATTEMPTS = 3

__all__ = ["History", "open_history", "read_result"]


class History:
    """Lazy, dask-backed view of the complete iterations of a cwtflow zarr store.

    Nothing is computed until asked: states are Datasets of dask arrays read from the store.
    Open with `open_history`.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    attrs : dict
        Root attrs (parameters, kernels, wcs, shape, chunks, variables, status, versions).
    iterations : list of int
        Complete iterations held (0 is the initial state); with ``keep_history=False`` only the
        newest one.
    inputs : xarray.Dataset
        The input maps (counts, background, exposure if given) with lon/lat coordinates.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        root = open_group(path)
        if root is None:
            raise StoreError(f"{path} is not a zarr store")
        self.attrs: dict[str, Any] = dict(root.attrs)
        check_root(path, self.attrs)
        check_root_digest(path, self.attrs)
        if not is_complete(open_group(path, "inputs")):
            raise StoreError(f"{path} holds no complete inputs (the run never started writing)")
        shape = (self.attrs["shape"][0], self.attrs["shape"][1])
        self.inputs = _open_checked(
            path, "inputs", {n: (("y", "x"), shape, "f") for n in INPUT_VARS[:2]}
        )
        expected = expected_variables(shape, self.kernels)
        expected = {n: e for n, e in expected.items() if n in ITERATION_VARS}
        for attempt in range(_ATTEMPTS):  # a writer may prune a group while this opens
            self.iterations: list[int] = complete_iterations(path)
            if not self.iterations:
                raise StoreError(f"{path} holds no complete iteration")
            try:
                self._groups = self._open_groups(expected)
                break
            except StoreError:
                if attempt + 1 == _ATTEMPTS or set(self.iterations) <= set(
                    complete_iterations(path)
                ):
                    raise  # not a pruned group: damage
        last = self.iterations[-1]
        self.infos: list[IterationInfo] = (
            table_infos(path, last, dict(self._groups[last].attrs)) if last else []
        )

    def _open_groups(self, expected: dict[str, tuple]) -> dict[int, xr.Dataset]:
        """Each complete iteration checked (presence, attrs digest) and pinned."""
        return {k: _open_checked(self.path, group_name(k), expected) for k in self.iterations}

    def __repr__(self) -> str:
        return (
            f"<cwtflow.History {self.path}: iterations {self.iterations}, "
            f"status {self.attrs['status']!r}>"
        )

    def __len__(self) -> int:
        return len(self.iterations)

    def __iter__(self) -> Iterator[int]:
        return iter(self.iterations)

    def __getitem__(self, k: int) -> xr.Dataset:
        return self.state(k)

    @property
    def parameters(self) -> dict[str, Any]:
        """Run parameters (as `CWT.parameters`)."""
        return dict(self.attrs["parameters"])

    @property
    def kernels(self) -> CWTKernels:
        """The kernels of the run."""
        return CWTKernels.from_dict(self.attrs["parameters"])

    @property
    def status(self) -> str:
        """``running``, ``converged`` or ``max_iter reached`` (as last recorded)."""
        return str(self.attrs["status"])

    @property
    def wcs(self) -> WCS:
        """The maps' celestial WCS (astropy)."""
        return wcs_from_attrs(self.attrs)

    def state(self, k: int) -> xr.Dataset:
        """Full state (inputs merged in) after iteration ``k``; ``-1`` is the newest.

        An iteration the store does not hold raises `NotFoundError` (a `KeyError`)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ParameterError(f"iteration must be an integer, got {k!r}")
        k = int(k)
        if -len(self.iterations) <= k < 0:
            k = self.iterations[k]
        if k not in self._groups:
            raise NotFoundError(f"iteration {k} is not in the store; it holds {self.iterations}")
        return compose_state(self.inputs, self._groups[k])

    @property
    def final(self) -> xr.Dataset:
        """The newest state, with the run summary in attrs like `CWT.analyze` returns it."""
        state = self.state(self.iterations[-1])
        state.attrs.update(run_summary(self.infos, self.parameters))
        return state

    def table(self) -> Table:
        """Per-iteration statistics (iterations 1..n): residual variance, variance ratio,
        converged, support size (pixels)."""
        return iteration_table(self.infos)

    def difference(self, later: int, earlier: int) -> xr.Dataset:
        """``state(later) - state(earlier)`` as `cwtflow.difference` defines it (lazy)."""
        return _difference(self.state(later), self.state(earlier))

    def stack(self, name: str, iterations: Sequence[int] | None = None) -> xr.DataArray:
        """One variable (stored, or a derived image such as ``residual``) over iterations,
        along a new leading ``iteration`` dimension (lazy). An unknown ``name`` raises
        `NotFoundError` (a `KeyError`)."""
        if not isinstance(name, str):
            raise ParameterError(f"variable name must be a string, got {name!r}")
        if name not in STATE_VARS and name not in IMAGES and name not in CUBES:
            raise NotFoundError(f"{name!r} is not a state variable or image")
        iters = list(self.iterations if iterations is None else iterations)
        arrays = []
        for k in iters:
            state = self.state(k)
            arrays.append(state[name] if name in state else _images(state)[name])
        out = xr.concat(arrays, dim="iteration", coords="minimal", compat="override", join="exact")
        out = out.assign_coords(iteration=("iteration", np.asarray(iters, dtype=np.int64)))
        return out.assign_attrs(variable_attrs(name))

    def to_datatree(self) -> xr.DataTree:
        """The history as an `xarray.DataTree`: root attrs at ``/``, the inputs at ``/inputs``
        and each state at ``/iterations/NNNN`` (lazy)."""
        tree = {"/": xr.Dataset(attrs=self.attrs), "/inputs": self.inputs}
        tree.update({f"/{group_name(k)}": self.state(k) for k in self.iterations})
        return xr.DataTree.from_dict(tree)


def _open_checked(path: Path, name: str, expected: dict[str, tuple]) -> xr.Dataset:
    """Complete group ``name`` pinned (`open_pinned`), with the ``expected`` variables, and
    its manifest checked for presence (`check_group`)."""
    digest = group_digest(path, name)
    ds = open_pinned(path, name, digest)
    check_dataset(path, name, ds, expected)
    if check_group(path, name) != digest:
        raise StoreError(f"{path}: group '{name}' changed while it was opened; reopen")
    return ds


def open_history(path: str | os.PathLike[str]) -> History:
    """Open the history of a run stored by ``CWT.analyze(..., store=path)``, lazily.

    Parameters
    ----------
    path : path
        The zarr store directory.

    Returns
    -------
    History
        Complete iterations only (groups of a killed run that were not marked complete are
        ignored); states are dask-backed and computed only when asked.

    Raises
    ------
    StoreError
        Not a cwtflow store, unsupported format version, corrupted metadata or missing arrays.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise StoreError(f"{path} is not a zarr store directory")
    return History(path)


def read_result(path: str | os.PathLike[str]) -> xr.Dataset:
    """The final state of the run stored at ``path`` (lazy), attrs as `CWT.analyze` returns."""
    return open_history(path).final
