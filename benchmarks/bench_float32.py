"""How far the float32 engine's result is from the float64 one (the exact path).

Two maps, each run in memory with ``CWT(dtype="float64")`` and ``CWT(dtype="float32")`` (the
same kernels, ``max_iter`` and ``tol``):

- the survey map of the sample data (`loaders.survey_maps`), with the PSF-only settings of
  `bench_catalog.py` (``CWTKernels.from_psf``, 0.15 deg), then `cwtflow.find_sources` on both
  results: the sources of each catalog matched to the other's nearest, the largest
  separation (target: every source within 0.01 deg), and the largest relative flux change;
- a ``--size``^2 simulated map (`loaders.simulated_sky`, the kernels of
  `bench_throughput.py`).

For each map: iterations run, the largest model difference relative to the model's maximum,
the support pixels that differ (all scales), and the residual variances' largest relative
difference. The speed of float32 is measured by ``bench_throughput.py --float32``.

Run::

    python benchmarks/bench_float32.py               # survey map and 2048^2
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import numpy as np
import xarray as xr
from astropy import units as u
from astropy.wcs.utils import proj_plane_pixel_scales
from bench_catalog import SETTINGS
from loaders import add_data_argument, simulated_sky, survey_maps

import cwtflow


def compare(name: str, data: xr.Dataset, kernels: cwtflow.CWTKernels, **options: Any) -> dict:
    """Run both dtypes on ``data``; print and return the differences."""
    runs = {
        dtype: cwtflow.CWT(kernels, dtype=dtype, **options).analyze(data)
        for dtype in ("float64", "float32")
    }
    exact, fast = runs["float64"], runs["float32"]
    model = exact["model"].values
    diff = np.abs(fast["model"].values.astype(np.float64) - model).max() / np.abs(model).max()
    flipped = int((fast["support"].values != exact["support"].values).sum())
    variances = np.asarray(exact.attrs["residual_variance"])
    fast_variances = np.asarray(fast.attrs["residual_variance"])
    same_length = len(variances) == len(fast_variances)
    variance = float(np.abs(fast_variances / variances - 1).max()) if same_length else float("nan")
    figures = {
        "iterations": (exact.attrs["iterations"], fast.attrs["iterations"]),
        "model_rel_diff": float(diff),
        "support_flipped": flipped,
        "support_pixels": int(exact["support"].values.sum()),
        "variance_rel_diff": variance,
    }
    print(
        f"{name}: iterations {figures['iterations'][0]} / {figures['iterations'][1]}, model "
        f"max |diff| / max {diff:.2e}, support pixels flipped {flipped} (of "
        f"{figures['support_pixels']} in the float64 support), residual variance max rel. "
        f"diff {variance:.2e}"
    )
    return {"figures": figures, "results": runs}


def catalogs(runs: dict[str, xr.Dataset]) -> None:
    """The two catalogs of the survey map, matched both ways."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exact, fast = (cwtflow.find_sources(runs[d]) for d in ("float64", "float32"))
    worst = 0.0
    for a, b in ((exact, fast), (fast, exact)):
        if len(a) and len(b):
            _, sep, _ = a["sky_centroid"].match_to_catalog_sky(b["sky_centroid"])
            worst = max(worst, float(sep.deg.max()))
    flux = float("nan")
    if len(exact) and len(fast):
        idx, _, _ = exact["sky_centroid"].match_to_catalog_sky(fast["sky_centroid"])
        reference = np.asarray(exact["flux"], dtype=float)
        flux = float(np.nanmax(np.abs(np.asarray(fast["flux"], dtype=float)[idx] / reference - 1)))
    verdict = "met" if len(exact) == len(fast) and worst < 0.01 else "NOT met"
    print(
        f"survey catalog: {len(exact)} sources in float64, {len(fast)} in float32; largest "
        f"separation to the other's nearest {worst:.2e} deg (target 0.01 deg: {verdict}); "
        f"largest relative flux change {flux:.2e}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="simulated map side (pixels)")
    add_data_argument(parser)
    args = parser.parse_args(argv)
    survey = survey_maps(args.data)
    if survey is None:
        print("survey map not found: its part is skipped", file=sys.stderr)
    else:
        psf = u.Quantity(SETTINGS["psf"])
        wcs = cwtflow.wcs_from_attrs(survey.attrs)
        pixel = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * u.deg
        kernels = cwtflow.CWTKernels.from_psf(psf, pixel)
        run = compare("survey map", survey, kernels, psf=psf)
        catalogs(run["results"])
    sky, _ = simulated_sky(
        (args.size, args.size), n_sources=args.size**2 // 40_000, seed=1, binsz=0.02
    )
    compare(f"simulated {args.size}^2", sky.load(), cwtflow.CWTKernels(2, 3.0, 1.5), tol=0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
