"""Input data of the benchmark scripts, each loader written once.

The scripts import this module as a sibling (``from loaders import ...``): Python puts the
folder of the script it runs first on ``sys.path``.

- The sample data folder: the real Fermi-LAT files read by ``bench_engine.py`` and
  ``bench_catalog.py``. It is the folder of public sample data that sits next to the checkout
  (``shared/data`` beside the repository's folder), or ``$CWTFLOW_SHARED_DATA`` when that is
  set; each script's ``--data`` option overrides both.
- `survey_maps`: the Fermi-LAT Galactic-plane survey map (counts, background, exposure).
- `reference_sources`: the positions of the 3FHL catalog's sources, the survey's ground truth.
- `simulated_sky`: a `cwtflow.simulate_sky` sky, optionally with a background model that is off
  by a smooth random field (``bench_tiled.py``, ``bench_cluster.py``, ``bench_catalog.py``).
- `survey_like_maps`: the in-memory simulated map of ``bench_engine.py``, built to have the
  survey's statistics; its figures in ``benchmarks/README.md`` were measured on this map.
- `lazy_simulated_maps`: a dask-backed simulated map generated tile by tile and never held in
  memory whole (``bench_memory.py``).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

import cwtflow
from cwtflow.maps import default_wcs, wcs_to_attrs

#: environment variable naming the sample data folder (the tests and notebooks honour it too)
DATA_ENV = "CWTFLOW_SHARED_DATA"
SURVEY_FILE = "fermi_survey_gal_plane.fits.gz"
CATALOG_FILE = "fermi_3fhl_catalog_v13.fits.gz"


# --- the sample data folder -----------------------------------------------------------------


def default_data_dir() -> Path:
    """The sample data folder: ``$CWTFLOW_SHARED_DATA`` if set, else ``shared/data`` next to
    the checkout (beside the repository's folder)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--data`` option of the scripts that read the sample data folder."""
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data_dir(),
        help=f"sample data folder (default: ${DATA_ENV} or shared/data next to the checkout)",
    )


def survey_maps(folder: Path) -> xr.Dataset | None:
    """The whole Fermi-LAT survey map (101 x 2001 px, 0.1 deg) read with `cwtflow.read_maps`.

    ``counts``, ``background`` and ``exposure`` from the file's three HDUs, on its Galactic CAR
    grid. ``None`` when the file is not in ``folder``, so that a script can skip its survey part
    with a message.
    """
    path = Path(folder) / SURVEY_FILE
    return cwtflow.read_maps(path) if path.is_file() else None


def reference_sources(folder: Path) -> SkyCoord:
    """All 1556 sources of the 3FHL catalog (``GLON``/``GLAT``), in Galactic coordinates."""
    catalog = Table.read(Path(folder) / CATALOG_FILE, hdu="LAT_Point_Source_Catalog")
    return SkyCoord(
        np.asarray(catalog["GLON"], float) * u.deg,
        np.asarray(catalog["GLAT"], float) * u.deg,
        frame="galactic",
    )


# --- simulated skies with cwtflow.simulate_sky ----------------------------------------------


def smooth_field(seed: int, shape: tuple[int, int], binsz: float = 0.1) -> np.ndarray:
    """Unit-rms random field: 12 plane waves of 1.5 - 8 deg wavelength on a ``binsz`` deg grid."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape, dtype=np.float64) * binsz
    field = np.zeros(shape)
    for _ in range(12):
        k = rng.uniform(1 / 8, 1 / 1.5)
        theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        field += np.cos(2 * np.pi * k * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    return field / field.std()


def simulated_sky(
    shape: tuple[int, int], *, seed: int, background_error: float = 0.0, **options
) -> tuple[xr.Dataset, Table]:
    """Maps and true sources from `cwtflow.simulate_sky` (``options`` are its keywords).

    With ``background_error`` > 0 the background handed to the detectors is the true one times
    ``1 + background_error * smooth_field`` (clipped at 0.2): a background model off by that
    relative rms, as a real diffuse model is.
    """
    maps, truth = cwtflow.simulate_sky(shape, seed=seed, **options)
    if background_error:
        field = smooth_field(seed + 7919, shape, options.get("binsz", 0.1))
        maps["background"] = maps["background"] * np.clip(1 + background_error * field, 0.2, None)
    return maps, truth


# --- bench_engine.py's in-memory map --------------------------------------------------------


def survey_like_maps(size: int, seed: int = 2048) -> xr.Dataset:
    """Poisson counts of a smooth Galactic-plane-like background plus point sources.

    Built to have the statistics of the real survey map (about 0.3 counts per pixel on
    average, a few hundred significant components per million pixels): an isotropic floor of
    0.12 counts/pixel, a band of 1 count/pixel along the middle row whose width and height
    vary along x, and one source per 3200 pixels with expected counts drawn from
    dN/dS ~ S**-2 between 30 and 500, blurred by a Gaussian PSF of sigma 2 px. A ``size`` x
    ``size`` map on `cwtflow.make_maps`'s default grid.
    """
    rng = np.random.default_rng(seed)
    y, x = np.indices((size, size), dtype=np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    width = size / 30 * np.exp(0.3 * np.sin(2 * np.pi * x / size * 3 + phase[0]))
    height = np.exp(0.4 * np.sin(2 * np.pi * x / size * 5 + phase[1]))
    background = 0.12 + height * np.exp(-0.5 * ((y - size / 2) / width) ** 2)
    background *= 1 + 0.1 * np.cos(2 * np.pi * y / size + phase[2])
    rate = background.copy()
    sigma = 2.0
    half = int(6 * sigma)
    offsets = np.arange(-half, half + 1)
    s_min, s_max = 30.0, 500.0
    for _ in range(round(size * size / 3200)):
        cy, cx = rng.uniform(half, size - half - 1, 2)
        # inverse CDF of dN/dS ~ S**-2 on [s_min, s_max]
        flux = 1 / (1 / s_min - rng.random() * (1 / s_min - 1 / s_max))
        iy, ix = int(cy), int(cx)
        gy = np.exp(-0.5 * ((iy + offsets - cy) / sigma) ** 2)
        gx = np.exp(-0.5 * ((ix + offsets - cx) / sigma) ** 2)
        blob = np.outer(gy, gx)
        rate[iy - half : iy + half + 1, ix - half : ix + half + 1] += flux * blob / blob.sum()
    return cwtflow.make_maps(rng.poisson(rate).astype(np.float64), background)


# --- bench_memory.py's lazy map -------------------------------------------------------------


def _sources(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """(n, 4) array of source (y, x, flux in counts, sigma in pixels)."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [
            rng.uniform(0, shape[0], n),
            rng.uniform(0, shape[1], n),
            rng.uniform(30.0, 300.0, n),
            rng.uniform(1.0, 3.0, n),
        ]
    )


def _background_block(y0: int, y1: int, x0: int, x1: int, level: float) -> np.ndarray:
    y = np.arange(y0, y1, dtype=np.float64)[:, None]
    x = np.arange(x0, x1, dtype=np.float64)[None, :]
    return level * (1.0 + 0.5 * np.sin(x / 400.0) * np.cos(y / 300.0) + 0.3 * np.exp(-y / 5000.0))


def _rate_block(y0, y1, x0, x1, level, sources) -> np.ndarray:
    """Background plus every source, each evaluated within 5 sigma of its centre only."""
    rate = _background_block(y0, y1, x0, x1, level)
    for sy, sx, flux, sigma in sources:
        reach = 5 * sigma
        ya, yb = max(y0, int(sy - reach)), min(y1, int(sy + reach) + 1)
        xa, xb = max(x0, int(sx - reach)), min(x1, int(sx + reach) + 1)
        if ya >= yb or xa >= xb:
            continue
        y = np.arange(ya, yb, dtype=np.float64)[:, None]
        x = np.arange(xa, xb, dtype=np.float64)[None, :]
        r2 = (y - sy) ** 2 + (x - sx) ** 2
        patch = flux * np.exp(-r2 / (2 * sigma**2)) / (2 * math.pi * sigma**2)
        rate[ya - y0 : yb - y0, xa - x0 : xb - x0] += patch
    return rate


def lazy_simulated_maps(
    shape: tuple[int, int], chunk: int, *, seed: int = 1, level: float = 0.5, n_sources: int = 2000
) -> xr.Dataset:
    """Lazy input Dataset: every tile of counts/background/lon/lat is generated on demand.

    A smooth background of about ``level`` counts per pixel plus ``n_sources`` Gaussian sources
    (30-300 counts, sigma 1-3 px) on a 0.02 deg Galactic CAR grid; each ``chunk`` x ``chunk``
    tile draws its Poisson counts from its own seed, so the map never needs to fit in memory.
    """
    sources = _sources(shape, n_sources, seed)
    wcs = default_wcs(shape, binsz=0.02)
    template = da.zeros(shape, chunks=chunk, dtype=np.float64)

    def background(block, block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return _background_block(y0, y1, x0, x1, level)

    def counts(block, block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        iy, ix = block_info[None]["chunk-location"]
        rng = np.random.default_rng([seed, iy, ix])
        return rng.poisson(_rate_block(y0, y1, x0, x1, level, sources)).astype(np.float64)

    def sky(block, axis, block_info=None):
        # CAR with CRVAL2 = 0 and no rotation: lon depends on x only, lat on y only.
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        if axis == 0:
            x = np.arange(x0, x1, dtype=np.float64)
            line = wcs.wcs_pix2world(x, np.zeros_like(x), 0)[0]
            return np.broadcast_to(line[None, :], (y1 - y0, x1 - x0)).copy()
        y = np.arange(y0, y1, dtype=np.float64)
        line = wcs.wcs_pix2world(np.zeros_like(y), y, 0)[1]
        return np.broadcast_to(line[:, None], (y1 - y0, x1 - x0)).copy()

    lon = da.map_blocks(sky, template, 0, dtype=np.float64)
    lat = da.map_blocks(sky, template, 1, dtype=np.float64)
    return xr.Dataset(
        {
            "counts": (("y", "x"), da.map_blocks(counts, template, dtype=np.float64)),
            "background": (("y", "x"), da.map_blocks(background, template, dtype=np.float64)),
        },
        coords={
            "lon": (("y", "x"), lon, {"units": "deg"}),
            "lat": (("y", "x"), lat, {"units": "deg"}),
        },
        attrs={"wcs": wcs_to_attrs(wcs)},
    )
