"""Peer (gammapy TS map + find_peaks) on the diagnosis grid; caches peaks per map."""

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import cwtflow

OUT = Path(os.environ.get("DIAG_DIR", "/tmp/catalog-diagnosis")) / "peer"
OUT.mkdir(parents=True, exist_ok=True)


def peer(maps, psf_pix, threshold=3.0):
    from gammapy.datasets import MapDataset
    from gammapy.estimators import TSMapEstimator
    from gammapy.estimators.utils import find_peaks
    from gammapy.maps import Map, MapAxis, WcsGeom
    from gammapy.modeling.models import GaussianSpatialModel, PowerLawSpectralModel, SkyModel

    wcs = cwtflow.wcs_from_attrs(maps.attrs)
    ny, nx = maps.sizes["y"], maps.sizes["x"]
    edges = [10, 2000] * u.GeV
    reco = MapAxis.from_energy_edges(edges, name="energy")
    true = MapAxis.from_energy_edges(edges, name="energy_true")
    geom = WcsGeom(wcs=wcs, npix=(nx, ny), axes=[reco])
    geom_true = WcsGeom(wcs=wcs, npix=(nx, ny), axes=[true])
    ds = MapDataset(
        counts=Map.from_geom(geom, data=maps["counts"].values[None].astype(float)),
        background=Map.from_geom(geom, data=maps["background"].values[None].astype(float)),
        exposure=Map.from_geom(
            geom_true, data=maps["exposure"].values[None].astype(float), unit="cm2 s"
        ),
    )
    sig = psf_pix * 0.1
    kernel = SkyModel(
        spatial_model=GaussianSpatialModel(sigma=f"{sig} deg"),
        spectral_model=PowerLawSpectralModel(index=2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = TSMapEstimator(kernel, energy_edges=edges).run(ds)
        peaks = find_peaks(res["sqrt_ts"], threshold=threshold, min_distance=2 * sig * u.deg)
    if len(peaks) == 0:
        return np.zeros((0, 3))
    return np.column_stack(
        [
            np.asarray(peaks["x"], float),
            np.asarray(peaks["y"], float),
            np.asarray(peaks["value"], float),
        ]
    )


if __name__ == "__main__":
    for cfg in common.configs():
        f = OUT / (common.key(*cfg) + ".npy")
        if f.exists():
            continue
        maps, truth = common.sim(*cfg)
        t0 = time.perf_counter()
        p = peer(maps, cfg[0])
        np.save(f, p)
        print(common.key(*cfg), len(p), f"{time.perf_counter() - t0:.1f}s", flush=True)
