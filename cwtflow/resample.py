"""All-sky HEALPix and CAR maps read and resampled onto a patch grid.

Choice (``docs/fullsky.md``): every map is turned into a *density* first — an extensive map
(counts, predicted background counts) is divided by its own pixel solid angle (counts/sr), an
intensive one (exposure, cm2 s) is taken as it is — then the density is interpolated
bilinearly (``reproject.reproject_from_healpix`` for HEALPix, ``reproject.reproject_interp``
for CAR) at ``f x f`` sub-pixel centres of every patch pixel, with ``f`` the ratio of the patch
pixel to the input pixel rounded up, and averaged over them (an integral over the pixel by
the midpoint rule); an extensive map is then multiplied by the patch pixel's solid angle.
The integral per solid angle is kept to the interpolation error; a coarse input is not
blocky, a fine one is not aliased.

Resampled *counts* are not Poisson: neighbouring patch pixels share input pixels (correlated)
and the values are not integers, so significances computed on them are approximate. Prefer an
event list, which is binned straight into each patch.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from .errors import InputError
from .maps import is_allsky
from .sky import pixel_solid_angle

__all__ = ["COORDSYS", "SkyMap", "read_sky_map", "resample"]

#: HEALPix COORDSYS -> frame
COORDSYS = {"G": "galactic", "C": "icrs", "Q": "icrs", "EQUATORIAL": "icrs", "GALACTIC": "galactic"}
#: largest sub-pixel factor per axis
MAX_OVERSAMPLE = 8


@dataclass(frozen=True)
class SkyMap:
    """One all-sky map: HEALPix (``nside``, ``nested``, ``frame``) or CAR (``wcs``)."""

    path: str
    kind: str  # "healpix" or "car"
    data: np.ndarray
    frame: str
    nside: int = 0
    nested: bool = False
    wcs: WCS | None = None

    @property
    def pixel_size(self) -> float:
        """Pixel size (deg): sqrt of the HEALPix pixel area, or the CAR latitude step."""
        if self.kind == "healpix":
            return math.degrees(math.sqrt(4 * math.pi / (12 * self.nside**2)))
        return float(abs(self.wcs.wcs.cdelt[1]))


def read_sky_map(path: str | os.PathLike[str]) -> SkyMap:
    """The HEALPix map (the first binary table with ``ORDERING``/``PIXTYPE`` cards) or all-sky
    CAR image (the first image with data) of the FITS file ``path``; read once per process.

    Raises `InputError` for an unknown HEALPix ordering or coordinate system, a partial-sky
    HEALPix map, a length that is not ``12 nside**2``, a CAR image that does not cover the
    sky, or NaN / negative pixels.
    """
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        raise InputError(f"{path}: no such map") from None
    return _read_cached((str(path.resolve()), stat.st_mtime_ns, stat.st_size), path)


@functools.lru_cache(maxsize=4)
def _read_cached(key: tuple, path: Path) -> SkyMap:
    try:
        hdul = fits.open(path)
    except OSError as exc:
        raise InputError(f"{path}: not a FITS file ({exc})") from None
    with hdul:
        for hdu in hdul:
            header = hdu.header
            if isinstance(hdu, fits.BinTableHDU) and (
                "ORDERING" in header or str(header.get("PIXTYPE", "")).upper() == "HEALPIX"
            ):
                skymap = _healpix(hdu, path)
                break
            if isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU) and hdu.data is not None:
                skymap = _car(hdu, path)
                break
        else:
            raise InputError(f"{path}: neither a HEALPix table nor an image")
    data = skymap.data
    if not np.isfinite(data).all():
        raise InputError(f"{path}: NaN or infinite pixels ({int((~np.isfinite(data)).sum())})")
    if (data < 0).any():
        raise InputError(
            f"{path}: negative pixels ({int((data < 0).sum())}; HEALPix UNSEEN pixels are "
            "not supported: give a full-sky map)"
        )
    return skymap


def _healpix(hdu: fits.BinTableHDU, path: Path) -> SkyMap:
    header = hdu.header
    ordering = str(header.get("ORDERING", "")).strip().upper()
    if ordering not in ("RING", "NESTED"):
        raise InputError(f"{path}: HEALPix ORDERING {ordering or 'missing'} (need RING or NESTED)")
    coordsys = str(header.get("COORDSYS", "")).strip().upper()
    if coordsys not in COORDSYS:
        raise InputError(
            f"{path}: HEALPix COORDSYS {coordsys or 'missing'} (need G for Galactic or C for "
            "equatorial)"
        )
    if str(header.get("INDXSCHM", "IMPLICIT")).strip().upper() != "IMPLICIT":
        raise InputError(f"{path}: partial-sky (explicit index) HEALPix maps are not supported")
    data = np.asarray(hdu.data.field(0), dtype=np.float64).ravel()
    nside = round(math.sqrt(data.size / 12))
    if 12 * nside**2 != data.size or nside & (nside - 1):
        raise InputError(f"{path}: {data.size} pixels is not a HEALPix map (12 nside**2)")
    if "NSIDE" in header and int(header["NSIDE"]) != nside:
        raise InputError(f"{path}: NSIDE {header['NSIDE']} but {data.size} pixels")
    return SkyMap(str(path), "healpix", data, COORDSYS[coordsys], nside, ordering == "NESTED")


def _car(hdu: Any, path: Path) -> SkyMap:
    data = np.asarray(hdu.data, dtype=np.float64)
    if data.ndim != 2:
        raise InputError(f"{path}: the image has {data.ndim} dimensions (need a 2-D map)")
    wcs = WCS(hdu.header)
    if not wcs.has_celestial or wcs.naxis != 2:
        raise InputError(f"{path}: the image has no celestial WCS")
    ctype = wcs.wcs.ctype[0].upper()
    frame = "galactic" if ctype.startswith("GLON") else "icrs"
    if not ctype.startswith(("GLON", "RA")):
        raise InputError(f"{path}: unsupported frame {ctype} (need GLON/GLAT or RA/DEC)")
    ny = data.shape[0]
    if not is_allsky(wcs, data.shape) or not np.isclose(abs(wcs.wcs.cdelt[1]) * ny, 180.0):
        raise InputError(f"{path}: a CAR map must cover the whole sky (360 x 180 deg)")
    return SkyMap(str(path), "car", data, frame, wcs=wcs)


def _oversampled(wcs: WCS, shape: tuple[int, int], f: int) -> tuple[WCS, tuple[int, int]]:
    fine = wcs.deepcopy()
    fine.wcs.cdelt = np.asarray(wcs.wcs.cdelt) / f
    fine.wcs.crpix = (np.asarray(wcs.wcs.crpix) - 0.5) * f + 0.5
    fine.wcs.set()
    return fine, (shape[0] * f, shape[1] * f)


def _density(skymap: SkyMap) -> np.ndarray:
    """Counts per sr of an extensive map."""
    if skymap.kind == "healpix":
        return skymap.data / (4 * math.pi / (12 * skymap.nside**2))
    return skymap.data / pixel_solid_angle(skymap.wcs, skymap.data.shape)


def resample(
    skymap: SkyMap, wcs: WCS, shape: tuple[int, int], *, extensive: bool, binsz: float
) -> np.ndarray:
    """``skymap`` on the patch grid (``wcs``, ``shape``, pixel ``binsz`` deg): counts per
    patch pixel for an ``extensive`` map (integral per solid angle kept), the pixel mean of
    the map's values otherwise (see the module docstring)."""
    from reproject import reproject_from_healpix, reproject_interp

    values = _density(skymap) if extensive else skymap.data
    f = int(min(MAX_OVERSAMPLE, max(1, math.ceil(binsz / skymap.pixel_size - 1e-9))))
    fine, fine_shape = _oversampled(wcs, shape, f)
    if skymap.kind == "healpix":
        out, _ = reproject_from_healpix(
            (values, skymap.frame), fine, shape_out=fine_shape, nested=skymap.nested
        )
    else:
        # wrap two columns around the seam and repeat two rows at the poles, so that every
        # sky position interpolates between real pixels
        padded = np.pad(values, ((2, 2), (0, 0)), mode="edge")
        padded = np.pad(padded, ((0, 0), (2, 2)), mode="wrap")
        wide = skymap.wcs.deepcopy()
        wide.wcs.crpix = np.asarray(wide.wcs.crpix) + 2
        wide.wcs.set()
        out, _ = reproject_interp((padded, wide), fine, shape_out=fine_shape)
    if not np.isfinite(out).all():
        raise InputError(f"{skymap.path}: the map does not cover the patch at {wcs.wcs.crval}")
    out = out.reshape(shape[0], f, shape[1], f).mean(axis=(1, 3))
    if extensive:
        out = out * pixel_solid_angle(wcs, shape)
    return np.maximum(out, 0.0)
