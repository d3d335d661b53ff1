"""The zarr store of a CWT run: its layout and crash-safety protocol, shared by the writer
(`cwtflow.store_writer`), the lazy reader (`cwtflow.history`) and the catalog kept beside the
history (`cwtflow.store_catalog`).

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
      catalog/                (optional) the run's source catalog, complete marker

Every array carries its ``dimension_names`` (zarr metadata) and ``units``/``long_name`` attrs,
so plain zarr readers need neither xarray nor cwtflow.

Crash safety. Zarr writes are not atomic as a whole, but writing one key is (temporary file and
rename), so a group *counts* only once the attribute `COMPLETE` is set, which happens in a
single metadata write after all its chunks are stored, together with the group's manifest and
attrs digest (`cwtflow.store_integrity.seal_group`). Readers ignore unmarked groups. A group
is only ever written fresh: a leftover unmarked group of a killed run is deleted first, and a
complete group is never overwritten. Deleting a group (`delete_group`) removes its marker
first, then moves its directory out of the hierarchy (``.deleted-...``, one rename: a reader
sees the whole group or none of it) and removes it there, so a kill midway leaves an ignored
leftover, which the next writer removes. Groups are created by copying the previous group's
layout (`copy_layout`) or through xarray, and their chunks written with zarr
(`write_region`). The root ``status``
(``running``, ``converged``, ``max_iter reached``) is informational: the markers are
authoritative.

One writer at a time. A writer (a run, or a catalog kept in the store) holds the lock file
``cwtflow.lock`` in the store while it writes (`cwtflow.store_lock`): a second writer is
refused naming the owner; the lock of a killed process on this host is taken over, one of
another host is broken with ``cwtflow unlock``. With ``keep_history=False`` the previous
complete iteration is pruned only once the new one is complete.

Integrity (`cwtflow.store_integrity`). Every chunk ends with its CRC32C and every chunk of the
grid is stored (empty ones too); each complete group's manifest lists its arrays' metadata and
every chunk's CRC in grid order, and the root and group attrs carry digests. Opening checks
presence (metadata, attrs, every chunk file), resuming and `verify_store` check every chunk.
Readers read through the manifest they opened: damage, or a group pruned or replaced by the
writer since, is a `StoreError`, never fill values.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

from .errors import StoreError
from .iteration import IterationInfo
from .kernels import CWTKernels
from .maps import wcs_from_attrs
from .state import CARRIED, STATE_VARS, VARIABLES
from .store_lock import LOCK_NAME

__all__ = [
    "COMPLETE",
    "DELETED",
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_VARS",
    "ITERATION_VARS",
    "check_dataset",
    "check_root",
    "clear_store",
    "complete_iterations",
    "compose_state",
    "copy_layout",
    "delete_group",
    "expected_variables",
    "group_name",
    "has_content",
    "is_complete",
    "iteration_dirs",
    "json_value",
    "open_dataset",
    "open_group",
    "remove_deleted",
    "table_infos",
    "unmark",
]

FORMAT = "cwtflow-history"
FORMAT_VERSION = 2
#: Attribute whose presence (True) makes a group count as completely written.
COMPLETE = "cwtflow_complete"
#: Input variables stored once in the ``inputs`` group (exposure only when given).
INPUT_VARS = ("counts", "background", "exposure")
#: State variables stored in every iteration group.
ITERATION_VARS = tuple(name for name in STATE_VARS if name not in INPUT_VARS)
STATUS_RUNNING = "running"
STATUS_CONVERGED = "converged"
STATUS_MAX_ITER = "max_iter reached"
ROOT_KEYS = (
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


def json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON attrs (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of ``attrs``."""
    out = {}
    for key, value in attrs.items():
        try:
            out[key] = json_value(value)
        except (TypeError, ValueError):
            continue
    return out


def group_name(k: int) -> str:
    return f"iterations/{k:04d}"


# --- store inspection -----------------------------------------------------------------------


def open_group(path: Path, name: str | None = None) -> zarr.Group | None:
    """The zarr group at ``path``/``name`` read-only, or None when there is none."""
    try:
        node = zarr.open_group(str(path), path=name or "", mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    except Exception as exc:  # unreadable metadata
        where = f"group '{name}'" if name else "root group"
        raise StoreError(f"{path}: cannot read the {where}: {exc}") from None
    return node


def is_complete(group: zarr.Group | None) -> bool:
    return group is not None and group.attrs.get(COMPLETE) is True


def iteration_dirs(path: Path) -> dict[int, Path]:
    """Iteration number -> group directory, for every ``iterations/NNNN`` directory present."""
    base = path / "iterations"
    if not base.is_dir():
        return {}
    out = {}
    for entry in base.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            out[int(entry.name)] = entry
    return dict(sorted(out.items()))


def complete_iterations(path: Path) -> list[int]:
    """Numbers of the iteration groups marked complete, ascending."""
    return [k for k in iteration_dirs(path) if is_complete(open_group(path, group_name(k)))]


def unmark(path: Path, name: str) -> None:
    """Remove the completion marker of group ``name`` (one atomic metadata write)."""
    group = zarr.open_group(str(path), path=name, mode="r+")
    attrs = dict(group.attrs)
    attrs.pop(COMPLETE, None)
    group.attrs.put(attrs)


def copy_layout(
    path: Path, source: str, target: str, attrs: dict[str, Any], shared: Iterable[str] = ()
) -> None:
    """Create group ``target`` (absent) laid out as group ``source``: the same arrays with the
    same metadata, the chunks of its coordinates and of the ``shared`` variables (hard links,
    `link_arrays`), no chunks of the other `ITERATION_VARS` (their writers' job); group attrs
    ``attrs``. What writing the next state's metadata through xarray creates, for a few file
    operations instead of ~0.1 s."""
    zarr.create_group(store=str(path), path=target, attributes=json_value(attrs))
    arrays = [e.name for e in sorted((path / source).iterdir()) if (e / "zarr.json").is_file()]
    written = [name for name in arrays if name in ITERATION_VARS and name not in shared]
    for name in written:
        (path / target / name).mkdir()
        shutil.copyfile(path / source / name / "zarr.json", path / target / name / "zarr.json")
    link_arrays(path, source, target, [name for name in arrays if name not in written])


def write_region(
    path: Path | str, group: str, region: tuple[slice, slice], arrays: dict[str, Any]
) -> None:
    """Write ``arrays`` (name -> values over the map's rows and columns ``region``, leading
    axes whole) into the existing arrays of group ``group``, empty chunks too (a manifest
    lists every chunk of the grid)."""
    for name, values in arrays.items():
        out = open_array(path, f"{group}/{name}", "r+")
        out.with_config({"write_empty_chunks": True})[(Ellipsis, *region)] = values


#: The arrays `open_array` keeps: (store, path, mode) -> (metadata bytes, array), newest last.
_OPENED: OrderedDict[tuple[str, str, str], tuple[bytes, zarr.Array]] = OrderedDict()
_OPENED_MAX = 256
_OPENED_LOCK = threading.Lock()


def open_array(path: Path | str, name: str, mode: str = "r") -> zarr.Array:
    """The zarr array ``name`` of the store at ``path``. Opening one costs about 1.5 ms (a tile
    task opens a dozen); an array opened before in this process (the last `_OPENED_MAX`) is
    reused while its metadata file holds the same bytes, whatever rewrote the store in between:
    an array is its metadata and its chunk files, which zarr reads afresh on every access."""
    key, meta_file = (str(path), name, mode), Path(path) / name / "zarr.json"
    meta = _read(meta_file)
    with _OPENED_LOCK:
        known = _OPENED.get(key)
        if meta is not None and known is not None and known[0] == meta:
            _OPENED.move_to_end(key)
            return known[1]
    array = zarr.open_array(store=str(path), path=name, mode=mode)
    if meta is not None and _read(meta_file) == meta:  # unchanged while it was opened
        with _OPENED_LOCK:
            _OPENED[key] = (meta, array)
            while len(_OPENED) > _OPENED_MAX:
                _OPENED.popitem(last=False)
    return array


def _read(file: Path) -> bytes | None:
    try:
        return file.read_bytes()
    except OSError:
        return None


def link_arrays(path: Path, source: str, target: str, names: Iterable[str]) -> None:
    """Give group ``target`` the arrays ``names`` of group ``source``, metadata and chunks, as
    hard links (copies where the file system has none): chunk files are only ever replaced,
    never rewritten in place, so the two groups can share them."""
    for name in names:
        shutil.copytree(path / source / name, path / target / name, copy_function=_link)


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links here
        shutil.copyfile(source, target)


#: Name prefix of a group's directory while `delete_group` removes it.
DELETED = ".deleted-"


def delete_group(path: Path, name: str) -> None:
    """Delete group ``name``: unmark it first (a kill midway leaves an ignored leftover), then
    move its directory out of the hierarchy in one rename and remove it there: a reader
    listing the group meanwhile finds all of it or nothing, never arrays losing their files
    (which zarr warns about). A kill during the removal leaves a `DELETED` directory, cleared
    by the next writer (`remove_deleted`)."""
    directory = path / name
    if not directory.exists():
        return
    if is_complete(open_group(path, name)):
        unmark(path, name)
    doomed = directory.with_name(f"{DELETED}{directory.name}-{uuid.uuid4().hex}")
    os.rename(directory, doomed)
    shutil.rmtree(doomed)


def remove_deleted(path: Path) -> None:
    """Remove what a killed `delete_group` left (in the root and ``iterations``)."""
    for parent in (path, path / "iterations"):
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(DELETED) and entry.is_dir():
                    shutil.rmtree(entry)


def check_root(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a root group that is not a readable cwtflow history of this format."""
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a cwtflow history store (root attr 'format' missing)")
    missing = [key for key in ROOT_KEYS if key not in attrs]
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
        CWTKernels.from_dict(params)
        wcs_from_attrs(attrs)
    except Exception as exc:  # junk of any type in parameters or WCS cards
        raise StoreError(f"{path}: corrupted store, bad root attrs: {exc!r}") from None
    if not isinstance(attrs["status"], str):
        raise StoreError(f"{path}: corrupted store, bad root attr 'status'")


def check_dataset(path: Path, name: str, ds: xr.Dataset, expected: dict[str, tuple]) -> None:
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


def open_dataset(path: Path, name: str) -> xr.Dataset:
    try:
        return xr.open_zarr(str(path), group=name, consolidated=False, chunks={})
    except Exception as exc:  # zarr/xarray raise many types on damaged metadata
        raise StoreError(f"{path}: corrupted store, cannot open group '{name}': {exc}") from None


def table_infos(path: Path, k: int, attrs: dict[str, Any]) -> list[IterationInfo]:
    """The statistics of iterations 1..k recorded in the attrs of iteration group ``k``."""
    try:
        infos = [IterationInfo.from_attrs(row) for row in attrs["table"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}: corrupted store, bad attrs of iteration {k}: {exc}") from None
    if [i.iteration for i in infos] != list(range(1, k + 1)):
        raise StoreError(
            f"{path}: corrupted store, iteration {k} records statistics of iterations "
            f"{[i.iteration for i in infos]}"
        )
    return infos


def has_content(path: Path) -> bool:
    """Whether directory ``path`` holds anything but a writer's lock file."""
    return path.is_dir() and any(entry.name != LOCK_NAME for entry in path.iterdir())


def clear_store(path: Path) -> None:
    """Delete everything in store ``path`` but the lock file: the root metadata first (the
    directory is no store any more), then the rest."""
    (path / "zarr.json").unlink(missing_ok=True)
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def expected_variables(shape: tuple[int, int], kernels: CWTKernels) -> dict[str, tuple]:
    """{variable: (dims, shape, dtype kind)} of a stored state."""
    out = {}
    for name in STATE_VARS:
        dims = VARIABLES[name][0]
        full = (kernels.n_scale, *shape) if len(dims) == 3 else shape
        out[name] = (dims, full, "b" if name == "support" else "f")
    return out


def compose_state(inputs: xr.Dataset, group: xr.Dataset) -> xr.Dataset:
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
