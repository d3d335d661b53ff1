"""Simulated skies of the catalog diagnosis: the skies of ``benchmarks/psf_rule.py`` (PSF sigma
1.5, 2.5, 4 px; background 0.3 and 1 count/px; sparse and crowded; background model exact or
off by a smooth 10 % rms field), two maps per configuration (seeds 3000, 3001: not the seeds
``psf_rule.py`` itself uses). ``DIAG_ERRS=0.2`` selects another model error,
``DIAG_SIM=catalog`` the skies of ``bench_catalog.py`` (PSF 1.5 px, extended sources too).
"""

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import psf_rule

PSFS = (1.5, 2.5, 4.0)
BKGS = (0.3, 1.0)
DENS = ("sparse", "crowded")
ERRS = tuple(float(e) for e in os.environ.get("DIAG_ERRS", "0.0,0.1").split(","))
NSEED = 2
SEED0 = 3000  # not psf_rule's 1000+ seeds


def configs():
    for psf, bkg, dens, err in itertools.product(PSFS, BKGS, DENS, ERRS):
        for s in range(NSEED):
            yield psf, bkg, dens, err, SEED0 + s


def key(psf, bkg, dens, err, seed):
    return f"p{psf}_b{bkg}_{dens}_e{err}_s{seed}"


def sim(psf, bkg, dens, err, seed):
    return psf_rule.simulate(psf, bkg, dens, seed, err)


if os.environ.get("DIAG_SIM") == "catalog":
    import bench_catalog

    PSFS = (1.5,)
    BKGS = (0.8,)
    DENS = ("cat",)
    NSEED = 8

    def sim(psf, bkg, dens, err, seed):
        from loaders import simulated_sky

        return simulated_sky(seed=seed, background_error=err, **bench_catalog.SIM)


if os.environ.get("DIAG_SIM") == "tail":
    # the same skies, but the true PSF has a broad tail the fit does not know: 85 % of a
    # source's counts in the Gaussian of sigma, 15 % in one of 3 sigma (r95 / r68 ~ 2.6)
    import numpy as np
    from loaders import smooth_field

    TAIL_FRACTION, TAIL_WIDTH = 0.15, 3.0

    def sim(psf, bkg, dens, err, seed):
        maps, truth = psf_rule.simulate(psf, bkg, dens, seed, 0.0)
        ny, nx = maps.sizes["y"], maps.sizes["x"]
        yy, xx = np.indices((ny, nx), dtype=np.float64)
        rate = np.asarray(maps["background"].values, dtype=np.float64).copy()
        for row in truth:
            for frac, s in ((1 - TAIL_FRACTION, psf), (TAIL_FRACTION, TAIL_WIDTH * psf)):
                r2 = (xx - row["x"]) ** 2 + (yy - row["y"]) ** 2
                rate += frac * row["counts"] * np.exp(-r2 / (2 * s * s)) / (2 * np.pi * s * s)
        rng = np.random.default_rng(seed + 99)
        maps["counts"] = (("y", "x"), rng.poisson(rate).astype(maps["counts"].dtype))
        if err:
            field = smooth_field(seed + 7919, (ny, nx))
            maps["background"] = maps["background"] * np.clip(1 + err * field, 0.2, None)
        return maps, truth
