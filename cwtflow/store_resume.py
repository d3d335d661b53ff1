"""What a store must match before a run resumes it: the settings, the map's shape and WCS, and
the input maps themselves (checksums); each mismatch raises `StoreError` naming it. Used by
`cwtflow.store_writer.ZarrSink` before anything of the store is changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import xarray as xr
from astropy.wcs import WCSCOMPARE_ANCILLARY

from .errors import StoreError
from .iteration import Settings
from .maps import raise_pixel_errors, wcs_from_attrs
from .store import INPUT_VARS, check_dataset, check_root, json_value, open_group
from .store_integrity import block_digests, check_root_digest, combine_digests
from .version import __version__

__all__ = ["check_compatible", "check_inputs"]

#: Parameters that may differ when resuming (they do not change the numbers).
RESUMABLE_PARAMS = ("max_iter",)


def check_compatible(
    path: Path, attrs: dict[str, Any], settings: Settings, data: xr.Dataset
) -> tuple[int, int]:
    """Refuse to resume the store at ``path`` (root ``attrs``) with ``settings`` on ``data``
    unless version, parameters, shape and WCS agree; returns the store's chunks (cy, cx)."""
    check_root(path, attrs)
    if attrs["cwtflow_version"] != __version__:
        raise StoreError(
            f"{path} was written by cwtflow {attrs['cwtflow_version']}, this is "
            f"{__version__}; resume with the same version or start a new store"
        )
    stored = attrs["parameters"]
    current = json_value(settings.parameters())
    diff = sorted(
        key
        for key in set(stored) | set(current)
        if key not in RESUMABLE_PARAMS and stored.get(key) != current.get(key)
    )
    if diff:
        details = ", ".join(f"{k}: store {stored.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise StoreError(f"{path} holds a run with other parameters ({details})")
    shape = (int(data.sizes["y"]), int(data.sizes["x"]))
    if tuple(attrs["shape"]) != shape:
        stored_shape = tuple(attrs["shape"])
        raise StoreError(f"{path} holds maps of shape {stored_shape}, the input is {shape}")
    stored_wcs = wcs_from_attrs(attrs)
    other = wcs_from_attrs(data.attrs).wcs
    if not stored_wcs.wcs.compare(other, cmp=WCSCOMPARE_ANCILLARY, tolerance=1e-10):
        raise StoreError(f"{path} holds maps with another WCS than the input's")
    check_root_digest(path, attrs)
    return attrs["chunks"][0], attrs["chunks"][1]  # checksum grid, zarr chunks


def check_inputs(
    path: Path,
    inputs: xr.Dataset,
    data: xr.Dataset,
    chunks: tuple[int, int],
    checks: dict[str, Any] | None = None,
) -> None:
    """Refuse a store whose ``inputs`` (its opened input group) differ from ``data``: arrays,
    then checksums on the store's ``chunks``; ``checks`` (`cwtflow.maps.pixel_checks` of a
    lazy input) are computed with the checksums."""
    shape = (int(data.sizes["y"]), int(data.sizes["x"]))
    names = [n for n in INPUT_VARS if n in data]
    stored_names = [n for n in INPUT_VARS if n in inputs]
    expected = {n: (("y", "x"), shape, "f") for n in ("counts", "background", *names)}
    check_dataset(path, "inputs", inputs, expected)  # required arrays first
    if names != stored_names:
        raise StoreError(
            f"{path} holds inputs {stored_names}, the input has {names}: other input maps"
        )
    group = open_group(path, "inputs")
    stored = group.attrs.get("checksums")
    if not isinstance(stored, dict) or set(stored) != set(names):
        raise StoreError(f"{path}: corrupted store, bad 'checksums' attr of the inputs")
    digests = {n: block_digests(data[n].data, chunks) for n in names}
    digests, values = dask.compute(digests, checks)
    if values is not None:
        raise_pixel_errors(data, values)
    for n in names:
        if combine_digests(shape, digests[n]) != stored[n]:
            raise StoreError(f"{path} holds other input maps: '{n}' differs (checksum)")
