"""Input maps from files, read without holding the whole map in the driver.

How each kind of input is read (`read_inputs`, behind `cwtflow.read_maps`):

- **Uncompressed FITS**: only the headers are parsed. Each image becomes a `FitsSection`, a
  small picklable description (path, byte offset of the data, shape, big-endian dtype from
  BITPIX, BSCALE/BZERO/BLANK) whose ``__getitem__`` maps the file with `numpy.memmap` and
  returns that window as float64. A lazy read wraps it in `dask.array.from_array`, so a chunk
  is read when (and where) a task needs it: no pixel travels in the task graph and
  distributed workers read the file themselves (same file system), and no file handle
  outlives a call. An in-memory read is the same reader asked for the whole window.
- **Gzip (or otherwise compressed) FITS**: astropy can only decompress an HDU as a whole, so
  such a file is read into memory when its maps hold at most `IN_MEMORY_BYTES` (256 MiB of
  float64 pixels, e.g. counts and background of 4096 x 4096); a larger one is refused with
  the hint to convert it once with `cwtflow.convert.convert_maps` (``cwtflow convert maps.fits.gz
  maps.zarr``), which streams it.
- **Zarr** (a directory): a Dataset written by cwtflow or xarray, a plain zarr group holding
  2-D ``counts``, ``background`` (and ``exposure``) arrays, or a cwtflow history store (its
  ``inputs`` group); the WCS cards are read from the group's ``attrs["wcs"]`` (as
  `cwtflow.maps.wcs_to_attrs` writes them). Arrays are read with `dask.array.from_zarr`.

Size rule (``chunks="auto"``): maps holding more than `IN_MEMORY_BYTES` as float64 stay lazy
(dask, `DEFAULT_CHUNK` x `DEFAULT_CHUNK` tiles), smaller ones are read into numpy. Counts,
background and exposure may come from different files. A FITS image may be a one-bin energy
cube (gammapy's layout: a third axis of length 1), which is squeezed; more bins are refused.

Checks: shapes, HDU kinds and WCS (from headers) are checked on opening; the pixel values
(NaN, negative) of a lazy read are checked by `CWT.analyze` in the same dask computation that
first reads the maps (`cwtflow.maps.pixel_checks`), not in a pass of their own.

`cwtflow.convert.convert_maps` streams FITS files (gzip included) into such a zarr Dataset.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, WCSCOMPARE_ANCILLARY, FITSFixedWarning

from .errors import InputError
from .maps import make_maps, wcs_from_attrs

__all__ = [
    "DEFAULT_CHUNK",
    "IN_MEMORY_BYTES",
    "FitsSection",
    "MapImage",
    "describe_maps",
    "existing_file",
    "parse_source",
    "read_inputs",
]

PathLike = str | os.PathLike[str]
HDUKey = str | int
#: A map in its own file: a path, or (path, HDU name or index).
Source = PathLike | tuple[PathLike, HDUKey | None]

#: float64 bytes of all maps above which ``chunks="auto"`` reads lazily (and gzip is refused).
IN_MEMORY_BYTES = 256 * 2**20
#: Tile side of a lazy read and chunk side of a converted store.
DEFAULT_CHUNK = 1024
#: Core WCS keywords named in mismatch messages (ancillary ones such as DATE-OBS are ignored).
_WCS_KEYS = ("CTYPE", "CUNIT", "CRPIX", "CRVAL", "CDELT", "PC", "CD", "LONPOLE", "LATPOLE")
_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_ROLES = ("counts", "background", "exposure")


# --------------------------------------------------------------------------------------------
# The per-chunk reader


class FitsSection:
    """The float64 pixels of one uncompressed FITS image, read on demand with `numpy.memmap`.

    Picklable and cheap (a path and a few numbers): ``section[y0:y1, x0:x1]`` maps the file,
    copies that window out as float64 (applying BSCALE/BZERO; BLANK becomes NaN) and unmaps
    it. Use it as the source of `dask.array.from_array`.
    """

    def __init__(
        self,
        path: PathLike,
        offset: int,
        shape: tuple[int, int],
        raw_dtype: str,
        *,
        bscale: float = 1.0,
        bzero: float = 0.0,
        blank: int | None = None,
    ) -> None:
        self.path = str(path)
        self.offset = int(offset)
        self.shape = (int(shape[0]), int(shape[1]))
        self.raw_dtype = np.dtype(raw_dtype)
        self.bscale, self.bzero = float(bscale), float(bzero)
        self.blank = blank
        self.dtype = np.dtype(np.float64)
        self.ndim = 2
        stat = os.stat(self.path)
        self._token = (self.path, stat.st_size, stat.st_mtime_ns, self.offset, self.shape)

    def __dask_tokenize__(self) -> Any:
        return ("cwtflow.FitsSection", *self._token, str(self.raw_dtype), self.bscale, self.bzero)

    def __getitem__(self, key: Any) -> np.ndarray:
        raw = np.memmap(self.path, self.raw_dtype, mode="r", offset=self.offset, shape=self.shape)
        window = raw[key]
        out = self.convert(window)
        del window, raw  # unmapped here, not kept alive by the result
        return out

    def convert(self, raw: np.ndarray) -> np.ndarray:
        """Raw FITS pixels of this image -> float64 values (a new array)."""
        out = raw.astype(np.float64)
        if self.blank is not None and self.raw_dtype.kind in "iu":
            out[out == self.blank] = np.nan
        if self.bscale != 1.0:
            out *= self.bscale
        if self.bzero != 0.0:
            out += self.bzero
        return out

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 8


# --------------------------------------------------------------------------------------------
# Paths, HDUs, headers


def existing_file(path: PathLike, error: type[Exception]) -> Path:
    """``path`` as a `Path`, or ``error`` when it does not exist or is not a file."""
    if not isinstance(path, str | os.PathLike):
        raise error(f"path must be a file name, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"file not found: {path}")
    if not path.is_file():
        raise error(f"not a file: {path}")
    return path


def parse_source(text: str) -> tuple[Path, HDUKey | None]:
    """``FILE[HDU]`` (command-line syntax) -> (path, HDU name or index); plain ``FILE`` ->
    (path, None). ``bkg.fits[BACKGROUND]``, ``bkg.fits[1]``."""
    match = re.fullmatch(r"(.+)\[([^\[\]]+)\]", text.strip())
    if match is None or Path(text).expanduser().exists():
        return Path(text).expanduser(), None
    key = match.group(2).strip()
    return Path(match.group(1)).expanduser(), int(key) if key.isdigit() else key


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        return not f.read(6).startswith(b"SIMPLE")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_gzip_stream(path: Path) -> None:
    """Read a gzip file to its end, so that its CRC is checked: astropy reads only the bytes
    it needs, and a stream damaged in the middle can decode to garbage pixels without an error.
    Raises `InputError` naming the file. Bounded memory (16 MiB at a time)."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read {path} as FITS: damaged gzip stream ({exc})") from None


def _open(path: Path) -> fits.HDUList:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdul = fits.open(path, memmap=True, lazy_load_hdus=False)
    except OSError as exc:
        raise InputError(f"cannot read {path} as FITS: {exc}") from None
    return hdul


def _label(hdu: Any, index: int) -> str:
    return hdu.name or f"#{index}"


def _index(hdul: fits.HDUList, key: HDUKey, path: Path) -> int:
    try:
        index = hdul.index_of(key)
        hdul[index]  # an integer key is not checked by index_of
        return index
    except (KeyError, IndexError):
        have = ", ".join(_label(h, i) for i, h in enumerate(hdul))
        raise InputError(f"HDU {key!r} not found in {path.name}; it has: {have}") from None


def _celestial_wcs(header: fits.Header, label: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except (ValueError, KeyError, MemoryError) as exc:
            raise InputError(f"HDU {label!r} has an unusable WCS: {exc}") from None
    if not wcs.has_celestial or wcs.celestial.naxis != 2 or wcs.naxis < 2:
        raise InputError(f"HDU {label!r} has no 2-D celestial WCS (CTYPE {list(wcs.wcs.ctype)})")
    if (wcs.wcs.lng, wcs.wcs.lat) != (0, 1):
        raise InputError(
            f"HDU {label!r}: longitude must be the first (x) axis and latitude the second "
            f"(CTYPE {list(wcs.wcs.ctype)})"
        )
    return wcs.celestial if wcs.naxis > 2 else wcs


def _wcs_differences(a: WCS, b: WCS) -> list[str]:
    """Core WCS cards whose values differ between ``a`` and ``b`` (for messages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ha, hb = a.to_header(), b.to_header()
    keys = [k for k in dict.fromkeys([*ha, *hb]) if k.rstrip("0123456789_").startswith(_WCS_KEYS)]
    out = []
    for key in keys:
        va, vb = ha.get(key), hb.get(key)
        same = (
            math.isclose(va, vb, rel_tol=1e-10, abs_tol=1e-10)
            if isinstance(va, float) and isinstance(vb, float)
            else va == vb
        )
        if not same:
            out.append(f"{key} {va!r} vs {vb!r}")
    return out


@dataclass
class MapImage:
    """One image HDU, described from its header: where its pixels are and what they mean."""

    role: str
    label: str
    path: Path
    index: int
    shape: tuple[int, int]
    wcs: WCS
    header: fits.Header
    offset: int
    compressed: bool  # gzip file or tile-compressed HDU: astropy must decompress it whole

    def section(self) -> FitsSection:
        h = self.header
        blank = h.get("BLANK") if h["BITPIX"] > 0 else None
        return FitsSection(
            self.path,
            self.offset,
            self.shape,
            _BITPIX[h["BITPIX"]],
            bscale=h.get("BSCALE", 1.0),
            bzero=h.get("BZERO", 0.0),
            blank=blank,
        )


def _describe_one(hdul: fits.HDUList, key: HDUKey, role: str, path: Path, gz: bool) -> MapImage:
    index = _index(hdul, key, path)
    hdu = hdul[index]
    label = hdu.name or str(key)
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        raise InputError(f"{role} HDU {label!r} is a {type(hdu).__name__}, not an image")
    header = hdu.header
    # astropy shows a compressed HDU's image header (NAXISn); older files may keep ZNAXISn
    prefix = "ZNAXIS" if "ZNAXIS" in header else "NAXIS"
    naxis = int(header.get(prefix, 0))
    shape = tuple(int(header.get(f"{prefix}{i}", 0)) for i in range(naxis, 0, -1))
    if naxis == 0 or 0 in shape:
        raise InputError(f"empty map: {role} HDU {label!r} has no pixels")
    if naxis < 2 or any(n != 1 for n in shape[:-2]):
        extra = ""
        if naxis == 3:
            ctype = header.get("CTYPE3", "axis 3")
            extra = (
                f": its third axis ({ctype}) has {shape[0]} bins; cwtflow takes one map (a "
                "one-bin energy cube is accepted), sum or select the bins first"
            )
        raise InputError(f"{role} HDU {label!r} is not a 2-D image (shape {shape}){extra}")
    wcs = _celestial_wcs(header, label)
    info = hdul.fileinfo(index)
    compressed = gz or isinstance(hdu, fits.CompImageHDU)
    return MapImage(role, label, path, index, shape[-2:], wcs, header, info["datLoc"], compressed)


def _pixels(image: MapImage, hdul: fits.HDUList) -> np.ndarray:
    """The whole image in memory, float64 (astropy decompresses compressed data)."""
    if not image.compressed:
        return image.section()[:, :]
    try:
        data = hdul[image.index].data
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"cannot read {image.role} HDU {image.label!r} of {image.path.name}: {exc}"
        ) from None
    return np.array(data, dtype=np.float64).reshape(image.shape)


def _source(value: Source) -> tuple[Path, HDUKey | None]:
    if isinstance(value, tuple):
        return Path(value[0]).expanduser(), value[1]
    if isinstance(value, str):
        return parse_source(value)
    return Path(value).expanduser(), None


def _default_key(hdul: fits.HDUList, role: str, path: Path) -> HDUKey:
    """In a file of its own, a map is the HDU named after its role, else the only image."""
    if role.upper() in hdul:
        return role.upper()
    images = [
        i
        for i, h in enumerate(hdul)
        if isinstance(h, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)
        and int(h.header.get("ZNAXIS" if "ZNAXIS" in h.header else "NAXIS", 0)) >= 2
    ]
    if len(images) == 1:
        return images[0]
    have = ", ".join(_label(h, i) for i, h in enumerate(hdul))
    raise InputError(
        f"{path.name}: no {role.upper()} HDU and not exactly one image to take as the "
        f"{role}; name it as FILE[HDU] (HDUs: {have})"
    )


# --------------------------------------------------------------------------------------------
# Reading


def _lazy(chunks: Any, nbytes: int) -> tuple[int, int] | None:
    """Tile shape of a lazy read, or None to read into memory."""
    if chunks is None:
        return None
    if isinstance(chunks, str):
        if chunks != "auto":
            raise InputError(f"chunks must be 'auto', None, an int or (ny, nx), got {chunks!r}")
        return (DEFAULT_CHUNK, DEFAULT_CHUNK) if nbytes > IN_MEMORY_BYTES else None
    cy, cx = (chunks, chunks) if np.ndim(chunks) == 0 else chunks
    for size in (cy, cx):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise InputError(f"chunk sizes must be positive integers, got {chunks!r}")
    return int(cy), int(cx)


def read_inputs(
    path: PathLike,
    *,
    counts_hdu: HDUKey = "COUNTS",
    background_hdu: HDUKey = "BACKGROUND",
    exposure_hdu: HDUKey | None = None,
    background: Source | None = None,
    exposure: Source | None = None,
    chunks: Any = "auto",
) -> xr.Dataset:
    """The input Dataset of FITS or zarr maps (see this module's docstring and
    `cwtflow.read_maps`, which adds the pixel checks); no pixel values are checked here."""
    path = Path(path).expanduser()
    if path.is_dir():
        if background is not None or exposure is not None:
            raise InputError("a zarr input holds its own background and exposure")
        return _read_zarr(path, chunks)
    path = existing_file(path, InputError)
    opened: dict[Path, tuple[fits.HDUList, bool]] = {}
    try:
        images = describe_maps(
            path, opened, counts_hdu, background_hdu, exposure_hdu, background, exposure
        )
        counts = images["counts"]
        nbytes = len(images) * counts.shape[0] * counts.shape[1] * 8
        tiles = _lazy(chunks, nbytes)
        compressed = [im for im in images.values() if im.compressed]
        if compressed and (tiles is not None and nbytes > IN_MEMORY_BYTES):
            im = compressed[0]
            raise InputError(
                f"{im.path.name} is compressed and its maps hold {nbytes / 2**20:.0f} MiB as "
                f"float64, over the {IN_MEMORY_BYTES // 2**20} MiB read into memory: convert it "
                f"once with `cwtflow convert {im.path.name} maps.zarr` and read the .zarr"
            )
        arrays = {}
        for role, im in images.items():
            if tiles is None or im.compressed:
                arrays[role] = _pixels(im, opened[im.path][0])
            else:
                import dask.array as da

                section = im.section()
                name = f"fits-{role}-" + _token(section)
                arrays[role] = da.from_array(
                    section, chunks=tiles, name=name, meta=np.empty((0, 0))
                )
    finally:
        for hdul, _ in opened.values():
            hdul.close()
    data = make_maps(
        arrays["counts"], arrays["background"], counts.wcs, exposure=arrays.get("exposure")
    )
    if tiles is not None:
        data = data.chunk({"y": tiles[0], "x": tiles[1]})
    return data


def _token(section: FitsSection) -> str:
    from dask.base import tokenize

    return tokenize(section)


def describe_maps(
    path: Path,
    opened: dict[Path, tuple[fits.HDUList, bool]],
    counts_hdu: HDUKey,
    background_hdu: HDUKey,
    exposure_hdu: HDUKey | None,
    background: Source | None,
    exposure: Source | None,
) -> dict[str, MapImage]:
    """Every map's `MapImage` (counts, background, exposure when there is one) from the
    headers, shapes and WCS checked against the counts'. ``opened`` receives every FITS file
    opened, as (HDUList, compressed): the caller closes them."""

    def hdul_of(p: Path) -> tuple[fits.HDUList, bool]:
        p = existing_file(p, InputError)
        if p not in opened:
            gz = _is_compressed(p)
            if gz and _is_gzip(p):
                _check_gzip_stream(p)
            opened[p] = (_open(p), gz)
        return opened[p]

    hdul, gz = hdul_of(path)
    counts = _describe_one(hdul, counts_hdu, "counts", path, gz)
    images = {"counts": counts}
    wanted: dict[str, tuple[Path, HDUKey | None]] = {}
    wanted["background"] = (path, background_hdu) if background is None else _source(background)
    if exposure is not None:
        wanted["exposure"] = _source(exposure)
    elif exposure_hdu is not None:
        wanted["exposure"] = (path, exposure_hdu)
    elif "EXPOSURE" in hdul:
        wanted["exposure"] = (path, "EXPOSURE")
    for role, (p, key) in wanted.items():
        other, other_gz = hdul_of(p)
        if key is None:
            key = _default_key(other, role, p)
        image = _describe_one(other, key, role, p, other_gz)
        _check_same_grid(image, counts)
        images[role] = image
    return images


def _check_same_grid(image: MapImage, counts: MapImage) -> None:
    if image.shape != counts.shape:
        raise InputError(
            f"{image.role} HDU {image.label!r} and counts HDU {counts.label!r} shapes differ: "
            f"{image.shape} vs {counts.shape}"
        )
    if not counts.wcs.wcs.compare(image.wcs.wcs, cmp=WCSCOMPARE_ANCILLARY, tolerance=1e-10):
        diff = "; ".join(_wcs_differences(image.wcs, counts.wcs)) or "projection parameters"
        raise InputError(
            f"WCS of {image.role} HDU {image.label!r} differs from counts HDU "
            f"{counts.label!r}: {diff}"
        )


def _read_zarr(path: Path, chunks: Any) -> xr.Dataset:
    import dask.array as da
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises many types on a directory that is not a store
        raise InputError(f"not a file nor a zarr store: {path} ({exc})") from None
    attrs = dict(group.attrs)
    if "counts" not in group and "inputs" in group:  # a cwtflow history store
        group = group["inputs"]
        attrs = {**attrs, **dict(group.attrs)}
    arrays: dict[str, Any] = {}
    for role in _ROLES:
        if role not in group:
            if role != "exposure":
                have = ", ".join(sorted(group.array_keys()))
                raise InputError(f"{path.name} has no '{role}' array (it has: {have or 'none'})")
            continue
        array = group[role]
        shape = tuple(array.shape)
        if len(shape) < 2 or any(n != 1 for n in shape[:-2]):
            raise InputError(f"'{role}' of {path.name} is not a 2-D map (shape {shape})")
        if 0 in shape:
            raise InputError(f"empty map: '{role}' of {path.name} has no pixels")
        arrays[role] = da.from_zarr(array).reshape(shape[-2:])
    if "wcs" not in attrs and "wcs" in group["counts"].attrs:
        attrs["wcs"] = dict(group["counts"].attrs["wcs"])
    wcs = _celestial_wcs(fits.Header(dict(wcs_from_attrs(attrs).to_header())), path.name)
    counts = arrays["counts"]
    for role, array in arrays.items():
        if array.shape != counts.shape:
            raise InputError(
                f"'{role}' and 'counts' of {path.name} shapes differ: {array.shape} vs "
                f"{counts.shape}"
            )
    tiles = _lazy(chunks, len(arrays) * counts.size * 8)
    if tiles is None:
        arrays = {k: np.asarray(v.compute(), dtype=np.float64) for k, v in arrays.items()}
    data = make_maps(arrays["counts"], arrays["background"], wcs, exposure=arrays.get("exposure"))
    if tiles is not None:
        data = data.chunk({"y": tiles[0], "x": tiles[1]})
    return data
