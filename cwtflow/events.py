"""Photon event lists: read (FITS table, Galactic or equatorial columns, energy cut) and binned
straight into a patch's pixel grid, so that the counts stay Poisson.

An event list is a FITS binary table (the HDU named EVENTS, else the first table) with either
``GLON``/``GLAT`` (Galactic) or ``RA``/``DEC`` (ICRS) columns in degrees, and optionally an
``ENERGY`` column for an energy cut ``emin <= E < emax`` (same unit as the column, or an
astropy Quantity). Positions are converted to the survey frame once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from .errors import InputError
from .sky import unit_vectors

__all__ = ["COLUMNS", "EventList", "bin_events", "is_event_list", "read_events"]

#: coordinate columns -> frame
COLUMNS = {("GLON", "GLAT"): "galactic", ("RA", "DEC"): "icrs"}


@dataclass(frozen=True)
class EventList:
    """Event positions in the survey frame (deg) and as unit vectors."""

    lon: np.ndarray
    lat: np.ndarray
    xyz: np.ndarray
    frame: str  # frame of the file's columns
    columns: tuple[str, str]

    def __len__(self) -> int:
        return len(self.lon)


def _table_hdu(hdul: fits.HDUList, path: Path) -> fits.BinTableHDU:
    if "EVENTS" in hdul:
        hdu = hdul["EVENTS"]
        if isinstance(hdu, fits.BinTableHDU):
            return hdu
    for hdu in hdul:
        if isinstance(hdu, fits.BinTableHDU):
            return hdu
    raise InputError(f"{path}: no FITS table of events")


def is_event_list(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a FITS table with event coordinate columns (not a HEALPix map)."""
    try:
        with fits.open(path, memmap=True) as hdul:
            hdu = _table_hdu(hdul, Path(path))
            names = {n.upper() for n in hdu.columns.names}
    except (InputError, OSError):
        return False
    return any(set(pair) <= names for pair in COLUMNS)


def _energy_value(value: Any, unit: str | None, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, u.Quantity):
        if not unit:
            raise InputError(f"{path}: the ENERGY column has no unit to compare {value} with")
        try:
            return float(value.to_value(unit))
        except u.UnitsError:
            raise InputError(f"{path}: energy cut {value} is not in ENERGY's unit {unit}") from None
    return float(value)


def read_events(
    path: str | os.PathLike[str],
    *,
    frame: str = "galactic",
    emin: Any = None,
    emax: Any = None,
) -> EventList:
    """The events of ``path`` (positions in ``frame``), cut to ``emin <= ENERGY < emax``.

    Raises `InputError` for a missing file, a file without an event table, a table without
    GLON/GLAT or RA/DEC columns, an energy cut without an ENERGY column, and NaN positions.
    Read once per process for the same file and cut (the patches of a survey share it).
    """
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        raise InputError(f"{path}: no such event list") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, frame, repr(emin), repr(emax))
    return _read_cached(key, path, frame, emin, emax)


@functools.lru_cache(maxsize=2)
def _read_cached(key: tuple, path: Path, frame: str, emin: Any, emax: Any) -> EventList:
    try:
        hdul = fits.open(path, memmap=True)
    except OSError as exc:
        raise InputError(f"{path}: not a FITS file ({exc})") from None
    with hdul:
        hdu = _table_hdu(hdul, path)
        names = {n.upper(): n for n in hdu.columns.names}
        found = [pair for pair in COLUMNS if set(pair) <= names.keys()]
        if not found:
            raise InputError(
                f"{path}: an event list needs GLON/GLAT or RA/DEC columns, found "
                f"{', '.join(hdu.columns.names) or 'none'}"
            )
        pair = found[0]
        data = hdu.data
        lon = np.asarray(data[names[pair[0]]], dtype=np.float64)
        lat = np.asarray(data[names[pair[1]]], dtype=np.float64)
        keep = np.ones(lon.shape, dtype=bool)
        if emin is not None or emax is not None:
            if "ENERGY" not in names:
                raise InputError(f"{path}: an energy cut needs an ENERGY column")
            unit = hdu.columns[names["ENERGY"]].unit
            energy = np.asarray(data[names["ENERGY"]], dtype=np.float64)
            low, high = _energy_value(emin, unit, path), _energy_value(emax, unit, path)
            if low is not None:
                keep &= energy >= low
            if high is not None:
                keep &= energy < high
    lon, lat = lon[keep], lat[keep]
    if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
        raise InputError(f"{path}: NaN or infinite event positions")
    if lat.size and (np.abs(lat).max() > 90):
        raise InputError(f"{path}: latitudes beyond +-90 deg in {pair[1]}")
    source = COLUMNS[pair]
    if source != frame:
        coords = SkyCoord(lon * u.deg, lat * u.deg, frame=source).transform_to(frame)
        sph = coords.spherical
        lon, lat = sph.lon.deg, sph.lat.deg
    return EventList(lon, lat, unit_vectors(lon, lat), source, pair)


def bin_events(events: EventList, wcs: WCS, shape: tuple[int, int], radius: float) -> np.ndarray:
    """Counts of ``events`` on the pixel grid (``wcs``, ``shape``); only the events within
    ``radius`` deg of the grid's reference point are projected (so a TAN grid never sees the
    far hemisphere)."""
    lon0, lat0 = wcs.wcs.crval
    near = events.xyz @ unit_vectors(lon0, lat0) >= np.cos(np.radians(min(radius, 179.0)))
    x, y = wcs.wcs_world2pix(events.lon[near], events.lat[near], 0)
    ny, nx = shape
    counts, _, _ = np.histogram2d(y, x, bins=(ny, nx), range=((-0.5, ny - 0.5), (-0.5, nx - 0.5)))
    return counts
