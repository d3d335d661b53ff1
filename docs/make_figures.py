"""Make the pictures the README shows, from a simulated sky (no external data needed).

Writes into this folder:

- ``result.png``: images of a CWT result (counts, model, residual, support) on sky axes;
- ``catalog.png``: the counts map with the detected sources (`cwtflow.find_sources`) and the true
  sources of the simulation marked.

Run from anywhere: ``python docs/make_figures.py``. Deterministic (fixed seed); each PNG stays
well under 200 kB.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import xarray as xr
from astropy import units as u
from astropy.table import Table
from matplotlib.figure import Figure

import cwtflow
from cwtflow.plotting import plot_images

HERE = Path(__file__).parent
SHAPE = (200, 400)
SEED = 0
#: Kernels matched to the simulation's PSF (Gaussian sigma 2 pixels): scales 2 and 4 pixels.
KERNELS = {"n_scale": 2, "min_scale": 2.0, "step_scale": 2.0}
SETTINGS = {"significance_threshold": 3.0, "max_iter": 10, "tol": 0.01}
MATCH_RADIUS = 3.0  # pixels: a detection within this of a true source finds it


def run() -> tuple[xr.Dataset, Table, Table]:
    """Simulate the sky, run the CWT on it and build its catalog."""
    maps, truth = cwtflow.simulate_sky(SHAPE, seed=SEED)
    cwt = cwtflow.CWT(cwtflow.CWTKernels(**KERNELS), **SETTINGS)
    result = cwt.analyze(maps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no sources found" cannot happen here
        catalog = cwtflow.find_sources(result, psf=0.2 * u.deg)  # simulate_sky: 2 px of 0.1 deg
    return result, catalog, truth


def matches(catalog: Table, truth: Table) -> tuple[np.ndarray, np.ndarray]:
    """Boolean arrays: which true sources were found, which detections match a true source."""
    if len(catalog) == 0 or len(truth) == 0:
        return np.zeros(len(truth), bool), np.zeros(len(catalog), bool)
    dx = np.asarray(catalog["x"])[:, None] - np.asarray(truth["x"])[None, :]
    dy = np.asarray(catalog["y"])[:, None] - np.asarray(truth["y"])[None, :]
    close = np.hypot(dx, dy) < MATCH_RADIUS
    return close.any(axis=0), close.any(axis=1)


def result_figure(result: xr.Dataset, path: Path) -> None:
    """Four images of the result in a 2 x 2 grid on sky axes, on a square-root colour scale
    (faint sources next to bright ones); `plot_images` lays it out and trims the margins."""
    plot_images(
        result,
        path,
        names=["counts", "model", "residual", "support_2d"],
        ncols=2,
        panel_width=5.5,
        stretch="sqrt",
        dpi=72,
    )


def catalog_figure(result: xr.Dataset, catalog: Table, truth: Table, path: Path) -> None:
    """Counts on sky axes, true sources as circles, detections as crosses."""
    wcs = cwtflow.wcs_from_attrs(result.attrs)
    found, real = matches(catalog, truth)
    ny, nx = result.sizes["y"], result.sizes["x"]
    fig = Figure(figsize=(10, 10 * ny / nx + 1.2))
    ax = fig.add_subplot(projection=wcs)
    counts = np.asarray(result["counts"].values)
    ax.imshow(np.sqrt(counts), origin="lower", cmap="Greys", interpolation="nearest")
    ax.scatter(
        truth["x"],
        truth["y"],
        s=160,
        facecolors="none",
        edgecolors=np.where(found, "tab:blue", "tab:orange"),
        linewidths=1.4,
        label=f"true sources ({found.sum()} of {len(truth)} found; orange: missed)",
    )
    ax.scatter(
        catalog["x"],
        catalog["y"],
        s=50,
        marker="x",
        color=np.where(real, "tab:red", "magenta"),
        linewidths=1.6,
        label=f"detected ({len(catalog)}, {int((~real).sum())} without a true source)",
    )
    ax.set_title("cwtflow catalog on a simulated sky (sqrt of counts)")
    ax.coords[0].set_axislabel("Galactic longitude")
    ax.coords[1].set_axislabel("Galactic latitude")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.savefig(path, dpi=72, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: docs/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result, catalog, truth = run()
    found, real = matches(catalog, truth)
    print(
        f"{SHAPE[0]} x {SHAPE[1]} px, seed {SEED}: {result.attrs['iterations']} iterations, "
        f"{len(catalog)} detections, {found.sum()}/{len(truth)} true sources found, "
        f"{int((~real).sum())} detections without a true source"
    )
    for name, make in (
        ("result.png", lambda p: result_figure(result, p)),
        ("catalog.png", lambda p: catalog_figure(result, catalog, truth, p)),
    ):
        path = args.out / name
        make(path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
