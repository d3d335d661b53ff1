"""``cwtflow convert``: FITS maps (gzip included) streamed into a zarr Dataset, once.

astropy decompresses a gzip HDU as a whole; this reads the decompressed stream (`gzip.open`)
sequentially instead. For each map (counts, background, exposure, possibly from different
files; located from the headers by `cwtflow.inputs.describe_maps`) the data section is read one
band of ``chunk`` rows at a time and written to the zarr array one ``chunk x chunk`` block at a
time, converted to float64 exactly as `cwtflow.inputs.FitsSection` converts a lazy read. Peak
memory is one band of raw pixels (``chunk x nx x bytes per pixel``) plus one float64 chunk: it
does not grow with the number of rows, nor with the number of maps. The result is what
`cwtflow.read_maps` reads lazily (`cwtflow.inputs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from .errors import InputError, StoreError
from .inputs import DEFAULT_CHUNK, HDUKey, MapImage, PathLike, Source, describe_maps, existing_file
from .maps import make_maps, wcs_to_attrs

__all__ = ["convert_maps"]


def convert_maps(
    path: PathLike,
    out: PathLike,
    *,
    counts_hdu: HDUKey = "COUNTS",
    background_hdu: HDUKey = "BACKGROUND",
    exposure_hdu: HDUKey | None = None,
    background: Source | None = None,
    exposure: Source | None = None,
    chunk: int = DEFAULT_CHUNK,
    overwrite: bool = False,
) -> Path:
    """Stream FITS maps (gzip included) into a zarr Dataset that `cwtflow.read_maps` reads
    lazily: float64 ``counts``, ``background`` (and ``exposure``) on (y, x) in ``chunk`` x
    ``chunk`` zarr chunks, the 1-D ``lon``/``lat`` coordinates of a separable grid and the
    WCS cards in ``attrs["wcs"]``.

    Each image's data section is read sequentially (`gzip.open` for a gzip file) one band of
    ``chunk`` rows at a time and written chunk by chunk, so memory holds one band of raw
    pixels and one float64 chunk. The output appears complete or not at all (written under a
    temporary name, then renamed). Values equal those `read_maps` reads from the FITS file.

    Raises `InputError` for bad input (as `read_maps`, pixel values excepted) and
    `StoreError` for an output that exists without ``overwrite``.
    """
    import gzip
    import secrets
    import shutil

    import zarr

    path = existing_file(path, InputError)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise StoreError(f"output exists: {out} (use --overwrite to replace it)")
    if not out.parent.is_dir():
        raise StoreError(f"output folder does not exist: {out.parent}")
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise InputError(f"chunk must be a positive integer, got {chunk!r}")
    opened: dict[Path, tuple[fits.HDUList, bool]] = {}
    try:
        images = describe_maps(
            path, opened, counts_hdu, background_hdu, exposure_hdu, background, exposure
        )
    finally:
        for hdul, _ in opened.values():
            hdul.close()
    gz = {p: flag for p, (_, flag) in opened.items()}
    counts = images["counts"]
    ny, nx = counts.shape
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        _create_store(tmp, images, counts, chunk)
        for role, image in images.items():
            array = zarr.open_array(str(tmp), path=role, mode="r+")
            opener = gzip.open if gz[image.path] else open
            section = image.section()  # the same conversion as a lazy read
            row_bytes = nx * section.raw_dtype.itemsize
            with opener(image.path, "rb") as f:
                f.seek(image.offset)
                for y0 in range(0, ny, chunk):
                    rows = min(chunk, ny - y0)
                    raw = np.frombuffer(
                        _read_exactly(f, rows * row_bytes, image), section.raw_dtype
                    )
                    raw = raw.reshape(rows, nx)
                    for x0 in range(0, nx, chunk):
                        block = raw[:, x0 : x0 + chunk]
                        array[y0 : y0 + rows, x0 : x0 + chunk] = section.convert(block)
                    del raw
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_exactly(f: Any, size: int, image: MapImage) -> bytes:
    buf = f.read(size)
    if len(buf) != size:
        raise InputError(f"{image.path.name}: {image.role} HDU {image.label!r} is truncated")
    return buf


def _create_store(tmp: Path, images: Mapping[str, MapImage], counts: MapImage, chunk: int) -> None:
    """An empty zarr Dataset of the maps' shape (metadata, coordinates and attrs)."""
    import dask.array as da

    ny, nx = counts.shape
    cy, cx = min(chunk, ny), min(chunk, nx)
    blank = da.zeros((ny, nx), chunks=(cy, cx), dtype=np.float64)
    full = make_maps(blank, blank, counts.wcs, exposure=blank if "exposure" in images else None)
    full.attrs["wcs"] = wcs_to_attrs(counts.wcs)
    full.attrs["converted_from"] = {
        role: f"{im.path.name}[{im.label}]" for role, im in images.items()
    }
    encoding = {role: {"chunks": (cy, cx)} for role in images}
    full.to_zarr(str(tmp), mode="w-", compute=False, encoding=encoding, consolidated=False)
