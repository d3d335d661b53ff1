"""Crash-safe zarr history of a CWT run: the store sink of `CWT.analyze` and its lazy reader.

Layout of a store (zarr format 3, one directory)::

    run.zarr/                 root group; attrs: format, format_version, cwtflow_version,
                              parameters, kernels (info table as [name, value] pairs), wcs
                              (FITS header cards), shape [ny, nx], chunks [cy, cx], variables
                              ({name: {dims, units, long_name}}), status
      inputs/                 counts, background (exposure if given), lon/lat coordinates;
                              attrs: the input's attrs, checksums, complete marker
      iterations/0000/        initial state: model, approx, approx_bkg, transform_2d,
                              transform_3d, error, support (+ scale coordinate)
      iterations/0001/ ...    state after iteration 1, ...; attrs: iteration, residual_variance,
                              variance_ratio, converged, support_size, table (the statistics of
                              iterations 1..k), complete marker

Every array carries its ``dimension_names`` (zarr metadata) and ``units``/``long_name`` attrs,
so plain zarr readers need neither xarray nor cwtflow.

Crash safety. Zarr writes are not atomic as a whole, but writing one key is (temporary file and
rename), so a group *counts* only once the attribute ``cwtflow_complete`` is set, which happens
in a single metadata write after all its chunks are stored. Readers (`open_history`, resume)
ignore unmarked groups. A group is only ever written fresh: a leftover unmarked group of a killed
run is deleted first, and a complete group is never overwritten. Deleting a superseded group
(``keep_history=False``) removes its marker first, then its files, and happens only after its
successor is marked complete. With ``keep_history=False`` the store keeps only the newest
complete iteration (``0000`` is deleted once ``0001`` is complete); its ``table`` attr still
lists the statistics of every iteration. The root ``status`` (``running``, ``converged``,
``max_iter reached``) is informational: the markers are authoritative.

Each iteration's state is read back lazily from the store, so the dask graph of the next
iteration starts from stored chunks and does not grow with the number of iterations; the
residual moments of the tiles (`cwtflow.core.residual_moments`) are computed with the write. A
tiled iteration whose tiles are independent is written in batches of tiles (`tile_batches`),
each its own computation, so that peak memory is set by the tile size, not by the map size.

Resuming checks that the store was written by this cwtflow version and format, with the same
parameters (``max_iter`` may be raised), on the same input maps (shape, WCS, and a block-wise
checksum of counts/background/exposure), and that its metadata is intact; anything else raises
`StoreError`. One process writes a store at a time. Only local directory stores are supported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from astropy.table import Table
from astropy.wcs import WCS, WCSCOMPARE_ANCILLARY
from dask.base import get_scheduler
from dask.system import CPU_COUNT

from .analysis import difference as _difference
from .analysis import images as _images
from .engine import CWT, IterationInfo
from .errors import InputError, StoreError
from .kernels import CWTKernels
from .maps import wcs_from_attrs
from .state import CARRIED, CUBES, IMAGES, STATE_VARS, VARIABLES, variable_attrs

__all__ = ["FORMAT", "FORMAT_VERSION", "History", "ZarrSink", "open_history", "read_result"]

FORMAT = "cwtflow-history"
FORMAT_VERSION = 1
#: Attribute whose presence (True) makes a group count as completely written.
COMPLETE = "cwtflow_complete"
#: Input variables stored once in the ``inputs`` group (exposure only when given).
INPUT_VARS = ("counts", "background", "exposure")
#: State variables stored in every iteration group.
ITERATION_VARS = tuple(name for name in STATE_VARS if name not in INPUT_VARS)
DEFAULT_CHUNK = 1024
STATUS_RUNNING = "running"
STATUS_CONVERGED = "converged"
STATUS_MAX_ITER = "max_iter reached"
#: Parameters that may differ when resuming (they do not change the numbers).
_RESUMABLE_PARAMS = ("max_iter",)
_ROOT_KEYS = (
    "format",
    "format_version",
    "cwtflow_version",
    "parameters",
    "kernels",
    "wcs",
    "shape",
    "chunks",
    "variables",
    "status",
)


def _version() -> str:
    from . import __version__

    return __version__


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON attrs (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def _group_name(k: int) -> str:
    return f"iterations/{k:04d}"


# --- store inspection -----------------------------------------------------------------------


def _open_group(path: Path, name: str | None = None) -> zarr.Group | None:
    """The zarr group at ``path``/``name`` read-only, or None when there is none."""
    try:
        node = zarr.open_group(str(path), path=name or "", mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    except Exception as exc:  # unreadable metadata
        where = f"group '{name}'" if name else "root group"
        raise StoreError(f"{path}: cannot read the {where}: {exc}") from None
    return node


def _is_complete(group: zarr.Group | None) -> bool:
    return group is not None and group.attrs.get(COMPLETE) is True


def _iteration_dirs(path: Path) -> dict[int, Path]:
    """Iteration number -> group directory, for every ``iterations/NNNN`` directory present."""
    base = path / "iterations"
    if not base.is_dir():
        return {}
    out = {}
    for entry in base.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            out[int(entry.name)] = entry
    return dict(sorted(out.items()))


def _complete_iterations(path: Path) -> list[int]:
    """Numbers of the iteration groups marked complete, ascending."""
    return [k for k in _iteration_dirs(path) if _is_complete(_open_group(path, _group_name(k)))]


def _unmark(path: Path, name: str) -> None:
    """Remove the completion marker of group ``name`` (one atomic metadata write)."""
    group = zarr.open_group(str(path), path=name, mode="r+")
    attrs = dict(group.attrs)
    attrs.pop(COMPLETE, None)
    group.attrs.put(attrs)


def _delete_group(path: Path, name: str) -> None:
    """Delete group ``name``: unmark it first, so a kill midway leaves an ignored leftover."""
    directory = path / name
    if not directory.exists():
        return
    if _is_complete(_open_group(path, name)):
        _unmark(path, name)
    shutil.rmtree(directory)


def _check_root(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a root group that is not a readable cwtflow history of this format."""
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a cwtflow history store (root attr 'format' missing)")
    missing = [key for key in _ROOT_KEYS if key not in attrs]
    if missing:
        raise StoreError(f"{path}: corrupted store, root attrs lack {', '.join(missing)}")
    if attrs["format_version"] != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {attrs['format_version']!r} is not supported "
            f"(this cwtflow reads version {FORMAT_VERSION})"
        )
    shape, chunks = attrs["shape"], attrs["chunks"]
    for key, value in (("shape", shape), ("chunks", chunks)):
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)
        ):
            raise StoreError(f"{path}: corrupted store, bad root attr '{key}': {value!r}")
    params = attrs["parameters"]
    try:
        CWTKernels(params["n_scale"], params["min_scale"], params["step_scale"])
        wcs_from_attrs(attrs)
    except (KeyError, TypeError, InputError, ValueError) as exc:
        raise StoreError(f"{path}: corrupted store, bad root attrs: {exc}") from None
    if not isinstance(attrs["status"], str):
        raise StoreError(f"{path}: corrupted store, bad root attr 'status'")


def _check_dataset(path: Path, name: str, ds: xr.Dataset, expected: dict[str, tuple]) -> None:
    """Refuse a group lacking a variable of ``expected`` {name: (dims, shape, dtype kind)}."""
    for var, (dims, shape, kind) in expected.items():
        if var not in ds.variables:
            raise StoreError(f"{path}: corrupted store, group '{name}' lacks '{var}'")
        v = ds.variables[var]
        if v.dims != dims or v.shape != shape or v.dtype.kind != kind:
            raise StoreError(
                f"{path}: corrupted store, '{name}/{var}' has dims {v.dims}, shape {v.shape}, "
                f"dtype {v.dtype}; expected {dims}, {shape}, kind {kind!r}"
            )


def _open_dataset(path: Path, name: str) -> xr.Dataset:
    try:
        return xr.open_zarr(str(path), group=name, consolidated=False, chunks={})
    except Exception as exc:  # zarr/xarray raise many types on damaged metadata
        raise StoreError(f"{path}: corrupted store, cannot open group '{name}': {exc}") from None


def _info_from_attrs(row: Any) -> IterationInfo:
    ratio = row["variance_ratio"]
    return IterationInfo(
        iteration=int(row["iteration"]),
        residual_variance=float(row["residual_variance"]),
        variance_ratio=math.nan if ratio is None else float(ratio),
        converged=bool(row["converged"]),
        support_size=int(row["support_size"]),
    )


def _table_infos(path: Path, k: int, attrs: dict[str, Any]) -> list[IterationInfo]:
    """The statistics of iterations 1..k recorded in the attrs of iteration group ``k``."""
    try:
        infos = [_info_from_attrs(row) for row in attrs["table"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}: corrupted store, bad attrs of iteration {k}: {exc}") from None
    if [i.iteration for i in infos] != list(range(1, k + 1)):
        raise StoreError(
            f"{path}: corrupted store, iteration {k} records statistics of iterations "
            f"{[i.iteration for i in infos]}"
        )
    return infos


# --- checksums ------------------------------------------------------------------------------


def _block_digest(block: np.ndarray) -> str:
    block = np.ascontiguousarray(block, dtype=np.float64)
    return hashlib.blake2b(memoryview(block).cast("B"), digest_size=16).hexdigest()


def _block_digests(array: Any, chunks: tuple[int, int]) -> list[Any]:
    """Digest of every (cy, cx) block of a 2-D array, row-major; delayed for dask arrays."""
    if isinstance(array, np.ndarray):
        ny, nx = array.shape
        return [
            _block_digest(array[y : y + chunks[0], x : x + chunks[1]])
            for y in range(0, ny, chunks[0])
            for x in range(0, nx, chunks[1])
        ]
    blocks = array.rechunk(chunks).to_delayed().ravel()
    return [dask.delayed(_block_digest, pure=True)(b) for b in blocks]


def _combine(shape: Sequence[int], digests: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([list(shape), "float64"]).encode())
    for d in digests:
        h.update(d.encode())
    return "blake2b:" + h.hexdigest()


# --- the sink -------------------------------------------------------------------------------


class ZarrSink:
    """Where `CWT.analyze` puts iterations when given a ``store``: a crash-safe zarr history.

    Parameters
    ----------
    store : path
        Directory of the zarr store (created if missing).
    cwt : CWT
        The estimator; its parameters go into the root attrs.
    data : xarray.Dataset
        Validated input maps (numpy- or dask-backed).
    resume : bool
        Continue the run held by an existing ``store``.
    overwrite : bool
        Replace an existing cwtflow store.

    The protocol: `start` (inputs and iteration 0, or the state of a resumed run), `write`
    (store one iteration's data, return the state read back and concrete statistics),
    `complete` (mark it complete, prune superseded groups), `history`.
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        cwt: CWT,
        data: xr.Dataset,
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other")
        if "://" in str(store):
            raise StoreError(f"{store}: only local directory stores are supported")
        self.path = Path(store).expanduser()
        self.cwt = cwt
        self.data = data
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        self.shape = (int(data.sizes["y"]), int(data.sizes["x"]))
        self.chunks = _store_chunks(data)
        self._inputs: xr.Dataset | None = None
        self._table: list[dict[str, Any]] = []  # attrs of the iterations done, 1..k
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory (zarr store)")
        self._existing = _has_content(self.path)
        if self._existing:
            root = _open_group(self.path)
            if root is None:
                raise StoreError(
                    f"{self.path} exists and is not a zarr store; refusing to touch it"
                )
            attrs = dict(root.attrs)
            if attrs.get("format") != FORMAT:
                raise StoreError(
                    f"{self.path} is not a cwtflow history store; refusing to touch it"
                )
            if not (resume or overwrite):
                raise StoreError(
                    f"{self.path} already exists; pass resume=True to continue it or "
                    "overwrite=True to replace it"
                )
            if resume:
                self._check_compatible(attrs)

    # -- validation ------------------------------------------------------------------------

    def _check_compatible(self, attrs: dict[str, Any]) -> None:
        path = self.path
        _check_root(path, attrs)
        if attrs["cwtflow_version"] != _version():
            raise StoreError(
                f"{path} was written by cwtflow {attrs['cwtflow_version']}, this is "
                f"{_version()}; resume with the same version or start a new store"
            )
        stored = attrs["parameters"]
        current = _json(self.cwt.parameters())
        diff = sorted(
            key
            for key in set(stored) | set(current)
            if key not in _RESUMABLE_PARAMS and stored.get(key) != current.get(key)
        )
        if diff:
            details = ", ".join(
                f"{k}: store {stored.get(k)!r}, now {current.get(k)!r}" for k in diff
            )
            raise StoreError(f"{path} holds a run with other parameters ({details})")
        self.chunks = (attrs["chunks"][0], attrs["chunks"][1])  # checksum grid, zarr chunks
        if tuple(attrs["shape"]) != self.shape:
            raise StoreError(
                f"{path} holds maps of shape {tuple(attrs['shape'])}, the input is {self.shape}"
            )
        stored_wcs = wcs_from_attrs(attrs)
        other = wcs_from_attrs(self.data.attrs).wcs
        if not stored_wcs.wcs.compare(other, cmp=WCSCOMPARE_ANCILLARY, tolerance=1e-10):
            raise StoreError(f"{path} holds maps with another WCS than the input's")

    # -- protocol ----------------------------------------------------------------------------

    def start(self, state: xr.Dataset) -> tuple[xr.Dataset, list[IterationInfo]]:
        """Prepare the store; the state to continue from and the iterations already done.

        A new store receives the inputs and ``state`` (the initial state) as iteration 0. A
        resumed store is checked against the inputs and cleaned of partial groups.
        """
        if self._existing and self.resume:
            resumed = self._resume()
            if resumed is not None:
                return resumed
        if self._existing:
            shutil.rmtree(self.path)
        self._create()
        self._write_inputs()
        self._write_group(0, state)
        self._mark(0, {"iteration": 0, "table": []})
        return self._open_state(0), []

    def write(
        self,
        k: int,
        state: xr.Dataset,
        moments: Any,
        *,
        independent_tiles: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> tuple[xr.Dataset, np.ndarray]:
        """Store iteration ``k`` (not yet complete) and compute its ``moments``.

        ``moments``: `cwtflow.core.residual_moments` of the map, or a dask array of them per
        tile (n_tiles_y, n_tiles_x, 4). ``independent_tiles``: (y, x) chunks of these tiles
        when each is computable on its own (`cwtflow.tiled.TiledStep.independent_tiles`); the
        state is then computed and written in groups of tiles (`tile_batches`) one after the
        other, unless a distributed scheduler runs the computation.

        Returns the state read back from the store and the moments as numpy.
        """
        name = _group_name(k)
        if _is_complete(_open_group(self.path, name)):
            raise StoreError(f"{self.path}: iteration {k} is already complete; not overwriting it")
        _delete_group(self.path, name)
        tiles = None if _distributed() else independent_tiles
        moments = self._write_group(k, state, moments, tiles=tiles)
        return self._open_state(k), moments

    def complete(self, k: int, state: xr.Dataset, info: IterationInfo) -> xr.Dataset:
        """Mark iteration ``k`` complete with ``info``; prune older groups without history."""
        self._table = [*self._table[: k - 1], info.attrs()]
        self._mark(k, {**info.attrs(), "table": self._table})
        if not self.cwt.keep_history:
            for old in _iteration_dirs(self.path):
                if old < k:
                    _delete_group(self.path, _group_name(old))
        self._set_status(self._status(k, info.converged))
        state.attrs.update(info.attrs())
        return state

    @property
    def history(self) -> list[xr.Dataset]:
        """With ``keep_history``: every complete iteration opened lazily (0 first); else []."""
        if not self.cwt.keep_history:
            return []
        return [self._open_state(k) for k in _complete_iterations(self.path)]

    # -- internals ---------------------------------------------------------------------------

    def _status(self, k: int, converged: bool) -> str:
        if converged:
            return STATUS_CONVERGED
        if k >= self.cwt.max_iter:
            return STATUS_MAX_ITER
        return STATUS_RUNNING

    def _set_status(self, status: str) -> None:
        root = zarr.open_group(str(self.path), mode="r+")
        if root.attrs.get("status") != status:
            root.attrs.update({"status": status})

    def _create(self) -> None:
        data = self.data
        names = [n for n in STATE_VARS]
        if "exposure" in data:
            names.append("exposure")
        variables = {}
        for name in names:
            if name in VARIABLES:
                dims, units, long_name = VARIABLES[name]
            else:
                dims = data[name].dims
                units = str(data[name].attrs.get("units", ""))
                long_name = str(data[name].attrs.get("long_name", name))
            variables[name] = {"dims": list(dims), "units": units, "long_name": long_name}
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cwtflow_version": _version(),
            "parameters": self.cwt.parameters(),
            "kernels": [[str(r["Name"]), str(r["Source"])] for r in self.cwt.kernels.info_table()],
            "wcs": dict(data.attrs["wcs"]),
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "scales": [float(s) for s in self.cwt.kernels.scales],
            "variables": variables,
            "status": STATUS_RUNNING,
        }
        try:
            zarr.open_group(str(self.path), mode="w-", attributes=_json(attrs))
        except Exception as exc:
            raise StoreError(f"cannot create the zarr store {self.path}: {exc}") from None

    def _encoding(self, ds: xr.Dataset) -> dict[str, dict[str, Any]]:
        sizes = {"y": self.chunks[0], "x": self.chunks[1], "scale": self.cwt.kernels.n_scale}
        return {
            name: {"chunks": tuple(min(sizes[d], ds.sizes[d]) for d in ds[name].dims)}
            for name in ds.variables
            if set(ds[name].dims) <= set(sizes) and ds[name].dims
        }

    def _rechunk(self, ds: xr.Dataset) -> xr.Dataset:
        """Dask-backed variables on exactly the store's chunks (dask and zarr chunks agree)."""
        spec = {"y": self.chunks[0], "x": self.chunks[1], "scale": -1}
        out = ds.copy()
        for name, var in ds.variables.items():
            if var.chunks is not None:
                out[name] = var.chunk({d: spec[d] for d in var.dims if d in spec})
        return out

    def _write_inputs(self) -> None:
        data = self.data
        names = [n for n in INPUT_VARS if n in data]
        coords = [c for c in ("lon", "lat") if c in data.coords]
        ds = xr.Dataset(
            {n: data[n].astype(np.float64).variable for n in names},
            coords={c: data.coords[c].variable for c in coords},
            attrs=_json_attrs(data.attrs),
        ).drop_encoding()
        ds = self._rechunk(ds)
        digests = {n: _block_digests(ds[n].data, self.chunks) for n in names}
        write = ds.to_zarr(
            str(self.path),
            group="inputs",
            mode="w-",
            consolidated=False,
            compute=False,
            encoding=self._encoding(ds),
        )
        _, digests = dask.compute(write, digests)
        checksums = {n: _combine(self.shape, digests[n]) for n in names}
        group = zarr.open_group(str(self.path), path="inputs", mode="r+")
        group.attrs.update({"checksums": checksums, COMPLETE: True})

    def _write_group(
        self,
        k: int,
        state: xr.Dataset,
        moments: Any = None,
        *,
        tiles: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> np.ndarray | None:
        """Write the non-input variables of ``state`` as group ``k``; returns ``moments``
        computed with the write (numpy).

        With ``tiles`` ((y, x) chunks of independent tiles, the chunks of a dask ``moments``):
        create the group, then compute and write it one group of tiles (`tile_batches`) at a
        time with those tiles' moments, so that memory holds the tiles of one batch, not a
        front of tiles that grows with the map (dask's static ordering of a halo graph reads
        far ahead).
        """
        ds = state[list(ITERATION_VARS)].drop_vars(
            [c for c in state.coords if c != "scale"], errors="ignore"
        )
        ds = self._rechunk(ds.drop_encoding())
        ds.attrs = {"iteration": k}
        target = {"store": str(self.path), "group": _group_name(k), "consolidated": False}
        batches = tile_batches(tiles, self.chunks) if tiles is not None else []
        if len(batches) <= 1:
            write = ds.to_zarr(**target, mode="w-", compute=False, encoding=self._encoding(ds))
            _, moments = dask.compute(write, moments)
            return None if moments is None else np.asarray(moments)
        # metadata, attrs and the in-memory scale coordinate now; the chunks batch by batch
        ds.to_zarr(**target, mode="w-", compute=False, encoding=self._encoding(ds))
        body = ds.drop_vars("scale", errors="ignore")
        edges = [np.cumsum([0, *axis]).tolist() for axis in tiles]
        out = np.empty(moments.shape)
        for region in batches:
            write = body.isel(region).to_zarr(**target, mode="r+", region=region, compute=False)
            ty, tx = (
                slice(e.index(region[d].start), e.index(region[d].stop))
                for e, d in zip(edges, ("y", "x"), strict=True)
            )
            _, out[ty, tx] = dask.compute(write, moments[ty, tx])
        return out

    def _mark(self, k: int, attrs: dict[str, Any]) -> None:
        group = zarr.open_group(str(self.path), path=_group_name(k), mode="r+")
        group.attrs.update({**_json(attrs), COMPLETE: True})

    def _inputs_ds(self) -> xr.Dataset:
        if self._inputs is None:
            self._inputs = _open_dataset(self.path, "inputs")
        return self._inputs

    def _open_state(self, k: int) -> xr.Dataset:
        return _state(self._inputs_ds(), _open_dataset(self.path, _group_name(k)))

    def _resume(self) -> tuple[xr.Dataset, list[IterationInfo]] | None:
        """Continue an existing store; None when it holds nothing worth keeping."""
        path = self.path
        inputs = _open_group(path, "inputs")
        complete = _complete_iterations(path)
        if not _is_complete(inputs):
            if complete:
                raise StoreError(f"{path}: corrupted store, complete iterations without inputs")
            return None  # killed while writing the inputs: start over
        self._check_inputs()
        for k in _iteration_dirs(path):
            if k not in complete or (complete and k > complete[-1]):
                _delete_group(path, _group_name(k))
        if not complete:
            self._write_group(0, _initial_from_inputs(self._inputs_ds(), self.cwt.kernels))
            self._mark(0, {"iteration": 0, "table": []})
            complete = [0]
        last = complete[-1]
        group = _open_group(path, _group_name(last))
        done = _table_infos(path, last, dict(group.attrs)) if last else []
        if len(done) > self.cwt.max_iter:
            raise StoreError(
                f"{path} already holds {len(done)} iterations, more than max_iter="
                f"{self.cwt.max_iter}"
            )
        state = self._open_state(last)
        _check_dataset(path, _group_name(last), state, _expected(self.shape, self.cwt.kernels))
        if not self.cwt.keep_history:
            for old in complete[:-1]:
                _delete_group(path, _group_name(old))
        self._table = [info.attrs() for info in done]
        status = self._status(len(done), done[-1].converged) if done else STATUS_RUNNING
        root = zarr.open_group(str(path), mode="r+")
        root.attrs.update({"parameters": _json(self.cwt.parameters()), "status": status})
        return state, done

    def _check_inputs(self) -> None:
        """Refuse a store whose inputs differ from ``data`` (arrays, then checksums)."""
        path = self.path
        inputs = self._inputs_ds()
        names = [n for n in INPUT_VARS if n in self.data]
        stored_names = [n for n in INPUT_VARS if n in inputs]
        expected = {n: (("y", "x"), self.shape, "f") for n in ("counts", "background", *names)}
        _check_dataset(path, "inputs", inputs, expected)  # required arrays first
        if names != stored_names:
            raise StoreError(
                f"{path} holds inputs {stored_names}, the input has {names}: other input maps"
            )
        group = _open_group(path, "inputs")
        stored = group.attrs.get("checksums")
        if not isinstance(stored, dict) or set(stored) != set(names):
            raise StoreError(f"{path}: corrupted store, bad 'checksums' attr of the inputs")
        digests = {n: _block_digests(self.data[n].data, self.chunks) for n in names}
        (digests,) = dask.compute(digests)
        for n in names:
            if _combine(self.shape, digests[n]) != stored[n]:
                raise StoreError(f"{path} holds other input maps: '{n}' differs (checksum)")


def _has_content(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def tile_batches(
    tiles: tuple[tuple[int, ...], tuple[int, ...]],
    align: tuple[int, int] = (1, 1),
    *,
    threads: int | None = None,
) -> list[dict[str, slice]]:
    """Regions of about ``side x side`` tiles covering a map, row by row: the groups of tiles
    a batched write computes one after the other.

    ``tiles`` are the (y, x) chunks of the tiles; region edges are tile edges that are also
    multiples of ``align`` (the store's chunks, so that no two regions write one zarr chunk).
    ``side`` is the smallest integer with ``side**2 >= 4 * threads`` and at least 4 (16 tiles
    on a 2-core machine): enough tiles to keep every thread busy, few enough that memory holds
    a fixed number of tiles. ``threads`` defaults to the local scheduler's (dask's
    ``num_workers`` setting, else the CPU count).
    """
    if threads is None:
        threads = dask.config.get("num_workers", None) or CPU_COUNT
    side = max(4, math.isqrt(4 * threads - 1) + 1)
    ys, xs = (_batch_edges(axis, step, side) for axis, step in zip(tiles, align, strict=True))
    return [
        {"y": slice(y0, y1), "x": slice(x0, x1)}
        for y0, y1 in itertools.pairwise(ys)
        for x0, x1 in itertools.pairwise(xs)
    ]


def _batch_edges(chunks: tuple[int, ...], align: int, side: int) -> list[int]:
    """Every ``side``-th tile edge along one axis that is a multiple of ``align``, with the
    axis ends."""
    edges = [int(e) for e in np.cumsum(chunks)[:-1] if e % align == 0]
    return [0, *edges[side - 1 :: side], int(sum(chunks))]


def _distributed() -> bool:
    """Whether dask computations currently run on a distributed scheduler."""
    get = get_scheduler()
    owner = getattr(get, "__self__", None)
    return type(owner).__module__.startswith("distributed")


def _store_chunks(data: xr.Dataset) -> tuple[int, int]:
    """Zarr chunk (cy, cx): the dask tiles of a lazy input, else up to 1024 x 1024."""
    chunks = data["counts"].chunks
    if chunks is not None:
        return int(chunks[0][0]), int(chunks[1][0])
    return min(DEFAULT_CHUNK, data.sizes["y"]), min(DEFAULT_CHUNK, data.sizes["x"])


def _json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of ``attrs``."""
    out = {}
    for key, value in attrs.items():
        try:
            out[key] = _json(value)
        except (TypeError, ValueError):
            continue
    return out


def _expected(shape: tuple[int, int], kernels: CWTKernels) -> dict[str, tuple]:
    """{variable: (dims, shape, dtype kind)} of a stored state."""
    out = {}
    for name in STATE_VARS:
        dims = VARIABLES[name][0]
        full = (kernels.n_scale, *shape) if len(dims) == 3 else shape
        out[name] = (dims, full, "b" if name == "support" else "f")
    return out


def _state(inputs: xr.Dataset, group: xr.Dataset) -> xr.Dataset:
    """A full state Dataset: inputs from ``inputs``, the rest (and scale) from ``group``."""
    data_vars = {}
    for name in (*STATE_VARS, *CARRIED):
        source = inputs if name in INPUT_VARS else group
        if name in source:
            data_vars[name] = source[name].variable
    coords = {c: inputs.coords[c].variable for c in ("lon", "lat") if c in inputs.coords}
    if "scale" in group.coords:
        coords["scale"] = group.coords["scale"].variable
    attrs = {k: v for k, v in inputs.attrs.items() if k not in (COMPLETE, "checksums")}
    attrs.update({k: v for k, v in group.attrs.items() if k not in (COMPLETE, "table")})
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _initial_from_inputs(inputs: xr.Dataset, kernels: CWTKernels) -> xr.Dataset:
    """The initial state built from a stored ``inputs`` group (lazy zeros)."""
    from .state import initial_state

    return initial_state(inputs, kernels)


# --- reading --------------------------------------------------------------------------------


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
        root = _open_group(path)
        if root is None:
            raise StoreError(f"{path} is not a zarr store")
        self.attrs: dict[str, Any] = dict(root.attrs)
        _check_root(path, self.attrs)
        if not _is_complete(_open_group(path, "inputs")):
            raise StoreError(f"{path} holds no complete inputs (the run never started writing)")
        self.iterations: list[int] = _complete_iterations(path)
        if not self.iterations:
            raise StoreError(f"{path} holds no complete iteration")
        self.inputs = _open_dataset(path, "inputs")
        shape = (self.attrs["shape"][0], self.attrs["shape"][1])
        _check_dataset(
            path, "inputs", self.inputs, {n: (("y", "x"), shape, "f") for n in INPUT_VARS[:2]}
        )
        expected = _expected(shape, self.kernels)
        self._groups: dict[int, xr.Dataset] = {}
        for k in self.iterations:
            group = _open_dataset(path, _group_name(k))
            _check_dataset(
                path,
                _group_name(k),
                group,
                {n: e for n, e in expected.items() if n in ITERATION_VARS},
            )
            self._groups[k] = group
        last = self.iterations[-1]
        self.infos: list[IterationInfo] = (
            _table_infos(path, last, dict(self._groups[last].attrs)) if last else []
        )

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
        p = self.attrs["parameters"]
        return CWTKernels(p["n_scale"], p["min_scale"], p["step_scale"])

    @property
    def status(self) -> str:
        """``running``, ``converged`` or ``max_iter reached`` (as last recorded)."""
        return str(self.attrs["status"])

    @property
    def wcs(self) -> WCS:
        """The maps' celestial WCS (astropy)."""
        return wcs_from_attrs(self.attrs)

    def state(self, k: int) -> xr.Dataset:
        """Full state (inputs merged in) after iteration ``k``; ``-1`` is the newest."""
        if k < 0:
            k = self.iterations[k]
        if k not in self._groups:
            raise KeyError(f"iteration {k} is not in the store; it holds {self.iterations}")
        return _state(self.inputs, self._groups[k])

    @property
    def final(self) -> xr.Dataset:
        """The newest state, with the run summary in attrs like `CWT.analyze` returns it."""
        state = self.state(self.iterations[-1])
        state.attrs.update(
            {
                "iterations": len(self.infos),
                "converged": bool(self.infos and self.infos[-1].converged),
                "residual_variance": [i.residual_variance for i in self.infos],
                "parameters": self.parameters,
            }
        )
        return state

    def table(self) -> Table:
        """Per-iteration statistics (iterations 1..n): residual variance, variance ratio,
        converged, support size (pixels)."""
        return Table(
            rows=[
                (i.iteration, i.residual_variance, i.variance_ratio, i.converged, i.support_size)
                for i in self.infos
            ],
            names=("iteration", "residual_variance", "variance_ratio", "converged", "support_size"),
            dtype=(np.int64, np.float64, np.float64, bool, np.int64),
        )

    def difference(self, later: int, earlier: int) -> xr.Dataset:
        """``state(later) - state(earlier)`` as `cwtflow.difference` defines it (lazy)."""
        return _difference(self.state(later), self.state(earlier))

    def stack(self, name: str, iterations: Sequence[int] | None = None) -> xr.DataArray:
        """One variable (stored, or a derived image such as ``residual``) over iterations,
        along a new leading ``iteration`` dimension (lazy)."""
        if name not in STATE_VARS and name not in IMAGES and name not in CUBES:
            raise KeyError(f"{name!r} is not a state variable or image")
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
        tree.update({f"/{_group_name(k)}": self.state(k) for k in self.iterations})
        return xr.DataTree.from_dict(tree)


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
