"""The writer of a run's zarr store (`ZarrSink`, the store sink of `CWT.analyze`), in the
layout and crash-safety protocol of `cwtflow.store`.

A new store receives the inputs once (with a block-wise checksum of each input map) and the
initial state as iteration 0; then every iteration is written as its own group and marked
complete. With ``keep_history=False`` the store keeps only the newest complete iteration
(``0000`` is deleted once ``0001`` is complete, its marker first); its ``table`` attr still
lists the statistics of every iteration.

Each lazy (tiled) iteration's state is read back lazily from the store, so the dask graph of
the next iteration starts from stored chunks and does not grow with the number of iterations;
the residual moments of the tiles (`cwtflow.core.residual_moments`) are computed with the
write. An iteration of numpy planes (the in-memory engine) is written and sealed by a
background thread (`cwtflow.background.BackgroundWriter`) while the next one computes from the
planes in memory (nothing is read back): at most one iteration is in flight, the next `write`
and `finish` wait for it and raise its error (a failed write is never sealed), and `close`
waits for it before releasing the lock.

A tiled iteration (`cwtflow.tiled.TileWork`) is written by `ZarrSink.write_tiles`: the group's
metadata here (the previous group's, `cwtflow.store.copy_layout`), then one task per tile
(`cwtflow.store_tiles`; an island threshold adds a labelling pass per tile and one join). An
iteration of numpy planes (the in-memory engine) is written the same way from here, whole
(`cwtflow.store.write_region`); the constant ``approx_bkg`` shares its files with the previous
group in both. Iteration 0 and lazy (dask) states go through xarray's ``to_zarr``.

Resuming checks that the store was written by this cwtflow version and format, with the same
parameters (``max_iter`` may be raised), on the same input maps (shape, WCS, and the
checksums), and that the inputs and the newest complete iteration are intact (every chunk
against the manifest); anything else raises `StoreError`. The sink holds the store's lock from
`start` to `close`. Only local directory stores are supported.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr

from .background import BackgroundWriter
from .errors import InputError, StoreError
from .iteration import IterationInfo, Settings
from .maps import grid_coords, raise_pixel_errors, wcs_from_attrs
from .state import STATE_VARS, VARIABLES, initial_state
from .store import (
    FORMAT,
    FORMAT_VERSION,
    INPUT_VARS,
    ITERATION_VARS,
    STATUS_CONVERGED,
    STATUS_MAX_ITER,
    STATUS_RUNNING,
    check_dataset,
    clear_store,
    complete_iterations,
    compose_state,
    copy_layout,
    delete_group,
    expected_variables,
    group_name,
    has_content,
    is_complete,
    iteration_dirs,
    json_attrs,
    link_arrays,
    open_dataset,
    open_group,
    remove_deleted,
    table_infos,
    write_region,
)
from .store_integrity import (
    WRITE_OPTIONS,
    block_digests,
    check_group,
    checksummed,
    combine_digests,
    group_digest,
    seal_group,
    update_root,
)
from .store_lock import LOCK_NAME, StoreLock
from .store_meta import consolidate
from .store_resume import check_compatible, check_inputs
from .store_tiles import compute_tiles
from .tiled import TileWork
from .version import __version__

__all__ = ["ZarrSink"]

#: Zarr chunk side of an in-memory input (a lazy input's tiles are its chunks).
DEFAULT_CHUNK = 1024

# --- the sink -------------------------------------------------------------------------------


class ZarrSink:
    """Where `CWT.analyze` puts iterations when given a ``store``: a crash-safe zarr history.

    Parameters
    ----------
    store : path
        Directory of the zarr store (created if missing).
    settings : Settings
        The run's settings; its parameters go into the root attrs.
    data : xarray.Dataset
        Validated input maps (numpy- or dask-backed).
    resume : bool
        Continue the run held by an existing ``store``.
    overwrite : bool
        Replace an existing cwtflow store.
    local_inputs : bool
        ``data`` is held in this process's memory (numpy maps chunked into dask arrays): its
        checks and writes (inputs and iteration 0) run on dask's threaded scheduler here, even
        when a cluster runs the iterations, so that no map travels inside a task graph; the
        workers then read the inputs from the store.

    The protocol: `start` (inputs and iteration 0, or the state of a resumed run), `write`
    (store one iteration's data, return the state to continue from and concrete statistics),
    `complete` (mark it complete, prune superseded groups), `finish` (the final state, read
    from the store), `history`.
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        settings: Settings,
        data: xr.Dataset,
        *,
        resume: bool = False,
        overwrite: bool = False,
        local_inputs: bool = False,
    ) -> None:
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other")
        if "://" in str(store):
            raise StoreError(f"{store}: only local directory stores are supported")
        self.path = Path(store).expanduser()
        self.settings = settings
        self.data = data
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        self.local_inputs = bool(local_inputs)
        self.shape = (int(data.sizes["y"]), int(data.sizes["x"]))
        self.chunks = _store_chunks(data)
        self._inputs: xr.Dataset | None = None
        self._written: dict[str, np.ndarray] = {}  # read-only planes of the last `write`
        self._table: list[dict[str, Any]] = []  # attrs of the iterations done, 1..k
        self._writer = BackgroundWriter(2, "cwtflow-store")  # numpy iterations and their seals
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory (zarr store)")
        self._lock = StoreLock(self.path)
        self._existing = False

    def close(self) -> None:
        """Release the store's lock (the run is over, or failed) once the background write
        has ended (an error of its own is raised by `finish`, not here)."""
        try:
            self._writer.close(raise_error=False)
        finally:
            self._lock.release()

    def _open_existing(self) -> None:
        """Take the lock, then check what the store holds (refusing what is not ours; a
        foreign directory is refused before any lock file is put into it)."""
        self._refuse_foreign()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        self._existing = has_content(self.path)
        if not self._existing:
            return
        attrs = self._refuse_foreign()
        if not (self.resume or self.overwrite):
            raise StoreError(
                f"{self.path} already exists; pass resume=True to continue it or "
                "overwrite=True to replace it"
            )
        if self.resume:
            self.chunks = check_compatible(self.path, attrs, self.settings, self.data)

    def _refuse_foreign(self) -> dict[str, Any]:
        """Root attrs of the store at ``path``; StoreError when it holds something else."""
        if not has_content(self.path) or (
            self._lock.held is False and (self.path / LOCK_NAME).exists()
        ):
            return {}
        root = open_group(self.path)
        if root is None:
            raise StoreError(f"{self.path} exists and is not a zarr store; refusing to touch it")
        attrs = dict(root.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path} is not a cwtflow history store; refusing to touch it")
        return attrs

    # -- protocol ----------------------------------------------------------------------------

    def start(
        self, state: xr.Dataset, *, checks: dict[str, Any] | None = None
    ) -> tuple[xr.Dataset, list[IterationInfo]]:
        """Prepare the store; the state to continue from and the iterations already done.

        A new store receives the inputs and ``state`` (the initial state) as iteration 0. A
        resumed store is checked against the inputs and cleaned of partial groups. The store's
        lock is taken first and held until `close`. ``checks`` (`cwtflow.maps.pixel_checks` of a
        lazy input) are computed with the write (or the checksums) of the inputs; bad pixels
        raise `InputError` and leave no store.
        """
        try:
            self._open_existing()
            if self._existing and self.resume:
                with self._local():
                    resumed = self._resume(checks)
                if resumed is not None:
                    return resumed
        except BaseException:
            self.close()
            raise
        if self._existing:
            clear_store(self.path)
        self._create()
        with self._local():
            self._write_inputs(checks)
            self._write_group(0, state)
        self._mark(0, {"iteration": 0, "table": []})
        consolidate(self.path)
        return self._open_state(0), []

    def write(self, k: int, state: xr.Dataset, moments: Any) -> tuple[xr.Dataset, np.ndarray]:
        """Store iteration ``k`` (not yet complete) and compute its ``moments`` with the write.

        ``moments``: `cwtflow.core.residual_moments` of the map, or a dask array of them per
        tile (n_tiles_y, n_tiles_x, 4). Returns the state to continue from (a lazy state read
        back from the store; numpy planes as given, written in the background) and the moments
        as numpy.
        """
        self._writer.wait()  # iteration k - 1 is written and sealed
        self._new_group(k)
        # a read-only numpy plane written at k - 1 (approx_bkg) is the same values: shared
        same = [n for n, a in self._written.items() if n in state and state[n].data is a]
        arrays = {n: state[n].data for n in ITERATION_VARS if n in state and n not in same}
        if all(isinstance(a, np.ndarray) for a in arrays.values()):
            # numpy: the previous group's layout, then plain zarr writes (as the tile tasks')
            # in the background; the next iteration starts from these planes
            copy_layout(self.path, group_name(k - 1), group_name(k), self._group_attrs(k), same)
            self._writer.submit(write_region, self.path, group_name(k), (slice(None),) * 2, arrays)
            moments = np.asarray(moments)
        else:
            moments = self._write_group(k, state.drop_vars(same), moments)
            link_arrays(self.path, group_name(k - 1), group_name(k), same)
            state = self._open_state(k)
        self._written = {
            n: a
            for n in ITERATION_VARS
            if isinstance(a := state[n].data, np.ndarray) and not a.flags.writeable
        }
        return state, moments

    def write_tiles(
        self, k: int, state: xr.Dataset, work: TileWork
    ) -> tuple[xr.Dataset, np.ndarray]:
        """Store iteration ``k`` (not yet complete) computed from ``state`` (the previous
        iteration, as read back from this store) by ``work``, one task per tile.

        Returns the state read back from the store and the moments per tile
        (n_tiles_y, n_tiles_x, 4), as `write` does.
        """
        previous = group_name(k - 1)
        done = is_complete(open_group(self.path, previous))
        if state.attrs.get("iteration") != k - 1 or not done:
            raise StoreError(f"{self.path}: iteration {k - 1} is not the complete state given")
        self._new_group(k)
        # the previous group's layout (approx_bkg's files too once constant); tasks write chunks
        shared = () if work.approx_bkg else ("approx_bkg",)
        copy_layout(self.path, previous, group_name(k), self._group_attrs(k), shared)
        digests = {name: group_digest(self.path, name) for name in ("inputs", previous)}
        moments = compute_tiles(str(self.path), previous, group_name(k), work, digests)
        return self._open_state(k), moments

    def complete(self, k: int, state: xr.Dataset, info: IterationInfo) -> xr.Dataset:
        """Mark iteration ``k`` complete with ``info``; prune older groups without history
        (after its background write, when it has one)."""
        self._table = [*self._table[: k - 1], info.attrs()]
        attrs = {**info.attrs(), "table": self._table}
        if self._writer.pending:  # after iteration k's background write
            self._writer.submit(self._seal, k, attrs, info.converged)
        else:
            self._seal(k, attrs, info.converged)
        state.attrs.update(info.attrs())
        return state

    def finish(self, state: xr.Dataset) -> xr.Dataset:
        """The final state once every write is done: ``state`` when it is read from the store
        already, else the last complete iteration opened from it (its attrs as `complete`
        left them)."""
        self._writer.wait()
        if not isinstance(state["model"].data, np.ndarray):
            return state
        # numpy planes: this run completed iterations 1..k, k the length of the table
        final = self._open_state(len(self._table))
        final.attrs.update(self._table[-1])
        return final

    @property
    def history(self) -> list[xr.Dataset]:
        """With ``keep_history``: every complete iteration opened lazily (0 first); else []."""
        if not self.settings.keep_history:
            return []
        return [self._open_state(k) for k in complete_iterations(self.path)]

    # -- internals ---------------------------------------------------------------------------

    def _local(self) -> Any:
        """Where the inputs' computations run: dask's threads here for ``local_inputs``."""
        if self.local_inputs:
            return dask.config.set(scheduler="threads")  # applied now, undone on exit
        return nullcontext()

    def _seal(self, k: int, attrs: dict[str, Any], converged: bool) -> None:
        """Mark group ``k`` complete with ``attrs``, prune, update the status, consolidate."""
        self._mark(k, attrs)
        if not self.settings.keep_history:
            for old in iteration_dirs(self.path):
                if old < k:
                    delete_group(self.path, group_name(old))
        self._set_status(self._status(k, converged))
        consolidate(self.path)

    def _status(self, k: int, converged: bool) -> str:
        if converged:
            return STATUS_CONVERGED
        if k >= self.settings.max_iter:
            return STATUS_MAX_ITER
        return STATUS_RUNNING

    def _set_status(self, status: str) -> None:
        root = zarr.open_group(str(self.path), mode="r+")
        if root.attrs.get("status") != status:
            update_root(self.path, {"status": status})

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
            "cwtflow_version": __version__,
            "parameters": self.settings.parameters(),
            "kernels": [
                [str(r["Name"]), str(r["Source"])] for r in self.settings.kernels.info_table()
            ],
            "wcs": dict(data.attrs["wcs"]),
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "scales": [float(s) for s in self.settings.kernels.scales],
            "variables": variables,
            "status": STATUS_RUNNING,
        }
        if (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: a store appeared while this writer held its lock")
        try:
            update_root(self.path, attrs, create=True)
        except Exception as exc:
            raise StoreError(f"cannot create the zarr store {self.path}: {exc}") from None

    def _encoding(self, ds: xr.Dataset) -> dict[str, dict[str, Any]]:
        sizes = {"y": self.chunks[0], "x": self.chunks[1], "scale": self.settings.kernels.n_scale}
        chunked = {
            name: {"chunks": tuple(min(sizes[d], ds.sizes[d]) for d in ds[name].dims)}
            for name in ds.variables
            if set(ds[name].dims) <= set(sizes) and ds[name].dims
        }
        return checksummed(chunked, ds.variables)

    def _rechunk(self, ds: xr.Dataset) -> xr.Dataset:
        """Dask-backed variables on exactly the store's chunks (dask and zarr chunks agree)."""
        spec = {"y": self.chunks[0], "x": self.chunks[1], "scale": -1}
        out = ds.copy()
        for name, var in ds.variables.items():
            if var.chunks is not None:
                out[name] = var.chunk({d: spec[d] for d in var.dims if d in spec})
        return out

    def _write_inputs(self, checks: dict[str, Any] | None = None) -> None:
        data = self.data
        names = [n for n in INPUT_VARS if n in data]
        coords = [c for c in ("lon", "lat") if c in data.coords]
        ds = xr.Dataset(
            {n: data[n].astype(np.float64).variable for n in names},
            coords={c: data.coords[c].variable for c in coords},
            attrs=json_attrs(data.attrs),
        ).drop_encoding()
        ds = self._rechunk(ds)
        digests = {n: block_digests(ds[n].data, self.chunks) for n in names}
        write = ds.to_zarr(
            str(self.path),
            group="inputs",
            mode="w-",
            consolidated=False,
            compute=False,
            encoding=self._encoding(ds),
            **WRITE_OPTIONS,
        )
        _, digests, values = dask.compute(write, digests, checks)
        if values is not None:
            try:
                raise_pixel_errors(data, values)
            except InputError:
                shutil.rmtree(self.path, ignore_errors=True)  # created by this run: bad input
                raise
        checksums = {n: combine_digests(self.shape, digests[n]) for n in names}
        self._lock.check()
        seal_group(self.path, "inputs", {"checksums": checksums})

    def _new_group(self, k: int) -> None:
        """Clear the place of iteration ``k``; refuse to overwrite a complete one."""
        name = group_name(k)
        if is_complete(open_group(self.path, name)):
            raise StoreError(f"{self.path}: iteration {k} is already complete; not overwriting it")
        delete_group(self.path, name)

    def _group_write(self, k: int, state: xr.Dataset) -> Any:
        """Create group ``k`` for the non-input variables of ``state`` (on the store's
        chunks); returns the delayed write of their chunks."""
        ds = state[[name for name in ITERATION_VARS if name in state]].drop_vars(
            [c for c in state.coords if c != "scale"], errors="ignore"
        )
        ds = self._rechunk(ds.drop_encoding()).assign_coords(
            grid_coords(wcs_from_attrs(self.data.attrs), self.shape)
        )
        ds.attrs = self._group_attrs(k)
        target = {"store": str(self.path), "group": group_name(k), "consolidated": False}
        target.update(WRITE_OPTIONS)
        return ds.to_zarr(**target, mode="w-", compute=False, encoding=self._encoding(ds))

    def _group_attrs(self, k: int) -> dict[str, Any]:
        """The attrs of iteration group ``k`` until it is complete."""
        return {"iteration": k, "wcs": dict(self.data.attrs["wcs"])}

    def _write_group(self, k: int, state: xr.Dataset, moments: Any = None) -> np.ndarray | None:
        """Write the non-input variables of ``state`` as group ``k``; returns ``moments``
        computed with the write (numpy)."""
        _, moments = dask.compute(self._group_write(k, state), moments)
        return None if moments is None else np.asarray(moments)

    def _mark(self, k: int, attrs: dict[str, Any]) -> None:
        self._lock.check()
        seal_group(self.path, group_name(k), attrs)

    def _inputs_ds(self) -> xr.Dataset:
        if self._inputs is None:
            self._inputs = open_dataset(self.path, "inputs")
        return self._inputs

    def _open_state(self, k: int) -> xr.Dataset:
        return compose_state(self._inputs_ds(), open_dataset(self.path, group_name(k)))

    def _resume(
        self, checks: dict[str, Any] | None = None
    ) -> tuple[xr.Dataset, list[IterationInfo]] | None:
        """Continue an existing store; None when it holds nothing worth keeping."""
        path = self.path
        remove_deleted(path)
        inputs = open_group(path, "inputs")
        complete = complete_iterations(path)
        if not is_complete(inputs):
            if complete:
                raise StoreError(f"{path}: corrupted store, complete iterations without inputs")
            return None  # killed while writing the inputs: start over
        check_inputs(path, self._inputs_ds(), self.data, self.chunks, checks)
        check_group(path, "inputs", full=True)
        state, done = None, []
        if complete:  # everything is checked before anything is deleted
            last = complete[-1]
            group = open_group(path, group_name(last))
            done = table_infos(path, last, dict(group.attrs)) if last else []
            if len(done) > self.settings.max_iter:
                raise StoreError(
                    f"{path} already holds {len(done)} iterations, more than max_iter="
                    f"{self.settings.max_iter}"
                )
            state = self._open_state(last)
            expected = expected_variables(self.shape, self.settings.kernels)
            check_dataset(path, group_name(last), state, expected)
            check_group(path, group_name(last), full=True)
        for k in iteration_dirs(path):
            if k not in complete or k > complete[-1]:
                delete_group(path, group_name(k))
        if state is None:
            kernels, dtype = self.settings.kernels, self.settings.dtype
            self._write_group(0, initial_state(self._inputs_ds(), kernels, dtype=dtype))
            self._mark(0, {"iteration": 0, "table": []})
            complete, state = [0], self._open_state(0)
        if not self.settings.keep_history:
            for old in complete[:-1]:
                delete_group(path, group_name(old))
        self._table = [info.attrs() for info in done]
        status = self._status(len(done), done[-1].converged) if done else STATUS_RUNNING
        update_root(path, {"parameters": self.settings.parameters(), "status": status})
        consolidate(path)
        return state, done


def _store_chunks(data: xr.Dataset) -> tuple[int, int]:
    """Zarr chunk (cy, cx): the dask tiles of a lazy input, else up to 1024 x 1024."""
    chunks = data["counts"].chunks
    if chunks is not None:
        return int(chunks[0][0]), int(chunks[1][0])
    return min(DEFAULT_CHUNK, data.sizes["y"]), min(DEFAULT_CHUNK, data.sizes["x"])
