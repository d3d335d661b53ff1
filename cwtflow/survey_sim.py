"""A simulated full sky for tests, benchmarks and the notebook: a photon event list (point
sources with a Gaussian PSF over a diffuse Galactic-like background), the predicted background
counts and the exposure as HEALPix maps."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy_healpix import HEALPix

__all__ = ["diffuse_density", "simulate_allsky", "write_healpix_map"]


def write_healpix_map(
    path: str | os.PathLike[str],
    values: np.ndarray,
    *,
    nested: bool = False,
    coordsys: str = "G",
    name: str = "VALUE",
    unit: str | None = None,
) -> Path:
    """Write a full-sky HEALPix map as a FITS binary table (one value per row)."""
    values = np.asarray(values, dtype=np.float64)
    nside = round(math.sqrt(values.size / 12))
    column = fits.Column(name=name, format="D", array=values, unit=unit)
    hdu = fits.BinTableHDU.from_columns([column], name="HEALPIX")
    hdu.header.update(
        {
            "PIXTYPE": "HEALPIX",
            "ORDERING": "NESTED" if nested else "RING",
            "COORDSYS": coordsys,
            "NSIDE": nside,
            "INDXSCHM": "IMPLICIT",
            "FIRSTPIX": 0,
            "LASTPIX": values.size - 1,
        }
    )
    path = Path(path)
    hdu.writeto(path, overwrite=True)
    return path


def diffuse_density(lon: Any, lat: Any, *, total: float) -> np.ndarray:
    """Counts per sr of a Galactic-like diffuse sky (isotropic + a disk of 5 deg scale height,
    brighter towards the inner Galaxy) with ``total`` counts over the whole sphere."""
    lon, lat = np.radians(lon), np.radians(lat)
    disk = np.exp(-np.abs(np.degrees(lat)) / 5.0) * (1.5 + np.cos(lon))
    shape = 0.3 + 4.0 * disk
    # normalise numerically on a fine grid
    g_lat = np.radians(np.linspace(-89.75, 89.75, 360))
    g_lon = np.radians(np.linspace(0.25, 359.75, 720))
    glon, glat = np.meshgrid(g_lon, g_lat)
    ref = 0.3 + 4.0 * np.exp(-np.abs(np.degrees(glat)) / 5.0) * (1.5 + np.cos(glon))
    integral = (ref * np.cos(glat)).sum() * math.radians(0.5) ** 2
    return shape * total / integral


def _offsets(rng: np.random.Generator, n: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Position angles and separations (deg) of a 2-D Gaussian of ``sigma`` deg."""
    return rng.uniform(0, 360, n), sigma * np.sqrt(-2 * np.log1p(-rng.uniform(0, 1, n)))


def simulate_allsky(
    folder: str | os.PathLike[str],
    sources: Table,
    *,
    psf_sigma: float,
    diffuse_counts: float,
    nside: int = 64,
    exposure: float = 3e11,
    seed: int = 0,
    columns: str = "galactic",
) -> dict[str, Any]:
    """Simulate a full sky into ``folder``: ``events.fits`` (GLON/GLAT, or RA/DEC with
    ``columns="icrs"``, and ENERGY in MeV from an E^-2 spectrum over 0.1-100 GeV),
    ``background.fits`` (predicted diffuse counts per HEALPix pixel of ``nside``, RING,
    Galactic) and ``exposure.fits`` (cm2 s, HEALPix).

    ``sources`` has ``glon``, ``glat`` (deg) and ``counts`` (expected photons). The diffuse
    photons are drawn per HEALPix pixel (Poisson of the background map), uniformly within the
    pixel, so the background map is the events' expectation.

    Returns the paths (``events``, ``background``, ``exposure``) and the ``sources`` table
    with the drawn photon numbers (``n_photons``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hp = HEALPix(nside, order="ring")
    pix = np.arange(hp.npix)
    clon, clat = (q.to_value(u.deg) for q in hp.healpix_to_lonlat(pix))
    predicted = diffuse_density(clon, clat, total=diffuse_counts) * hp.pixel_area.to_value(u.sr)
    n_diffuse = rng.poisson(predicted)
    index = np.repeat(pix, n_diffuse)
    dlon, dlat = hp.healpix_to_lonlat(
        index, dx=rng.uniform(size=index.size), dy=rng.uniform(size=index.size)
    )
    lon, lat = [dlon.to_value(u.deg)], [dlat.to_value(u.deg)]
    drawn = rng.poisson(np.asarray(sources["counts"], dtype=np.float64))
    centres = SkyCoord(
        np.repeat(np.asarray(sources["glon"], dtype=np.float64), drawn) * u.deg,
        np.repeat(np.asarray(sources["glat"], dtype=np.float64), drawn) * u.deg,
        frame="galactic",
    )
    if len(centres):
        angle, sep = _offsets(rng, len(centres), psf_sigma)
        moved = centres.directional_offset_by(angle * u.deg, sep * u.deg)
        lon.append(moved.l.deg)
        lat.append(moved.b.deg)
    lon_all, lat_all = np.concatenate(lon) % 360.0, np.concatenate(lat)
    order = rng.permutation(lon_all.size)
    lon_all, lat_all = lon_all[order], lat_all[order]
    energy = 100.0 / (1 - rng.uniform(size=lon_all.size) * (1 - 1e-3))  # E^-2, 0.1-100 GeV
    if columns == "icrs":
        icrs = SkyCoord(lon_all * u.deg, lat_all * u.deg, frame="galactic").icrs
        names, pair = ("RA", "DEC"), (icrs.ra.deg, icrs.dec.deg)
    else:
        names, pair = ("GLON", "GLAT"), (lon_all, lat_all)
    cols = [
        fits.Column(name=names[0], format="D", array=pair[0], unit="deg"),
        fits.Column(name=names[1], format="D", array=pair[1], unit="deg"),
        fits.Column(name="ENERGY", format="E", array=energy, unit="MeV"),
    ]
    events = folder / "events.fits"
    fits.BinTableHDU.from_columns(cols, name="EVENTS").writeto(events, overwrite=True)
    background = write_healpix_map(folder / "background.fits", predicted, name="NPRED", unit="ct")
    expo = exposure * (1.0 + 0.2 * np.cos(np.radians(clat)))
    exposure_path = write_healpix_map(folder / "exposure.fits", expo, name="EXPOSURE", unit="cm2 s")
    table = Table(sources, copy=True)
    table["n_photons"] = drawn
    return {
        "events": events,
        "background": background,
        "exposure": exposure_path,
        "sources": table,
    }
