"""Derive the PSF rule (``docs/psf_rule.md``) on simulations: kernel scale and minimum separation
against the PSF size, background level and source density.

    python benchmarks/psf_rule.py --out docs            # the table and docs/psf_rule.png

For every PSF sigma (1.5, 2.5, 4 px on a 0.1 deg grid), background level (0.3 and 1 count per
pixel on the plane's crest), source density (sparse and crowded), background-model error (none,
10 %) and smallest kernel scale ``min_scale = k * sigma`` (k in 0.5 .. 1.25; two scales,
step 2), simulated skies
(`cwtflow.simulate_sky`, point sources, dN/dS ~ S^-2 with counts scaled by the PSF's size;
the background model handed to the detector exact or off by a smooth 10 % rms field) go
through the CWT and `find_sources` with a low threshold; pooling the maps of a configuration,
the TS threshold that gives a fixed false-detection rate (`FALSE_PER_BEAM` false detections
per PSF beam of 4 pi sigma^2) is found, and the completeness at that threshold is reported. The
rule picks the k that maximises completeness over all configurations. A second scan varies
the minimum separation (in PSF sigmas) at the chosen k on crowded skies.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import Table
from loaders import simulated_sky

import cwtflow

PSFS = (1.5, 2.5, 4.0)  # pixels
KS = (0.5, 0.75, 1.0, 1.25)
BACKGROUNDS = (0.3, 1.0)
#: relative rms of the smooth error of the background model handed to the detector
BACKGROUND_ERRORS = (0.0, 0.1)
DENSITIES = {"sparse": 1 / 2500, "crowded": 1 / 800}  # sources per pixel at sigma 1.5 px
SEPARATIONS = (1.0, 1.5, 2.0, 3.0)
SHAPE = (120, 1000)
BINSZ = 0.1
#: false detections allowed per PSF beam (4 pi sigma^2) at the fixed-false-rate threshold
FALSE_PER_BEAM = 2e-4


def simulate(psf: float, background: float, density: str, seed: int, error: float = 0.0):
    area_scale = (psf / 1.5) ** 2
    n = round(SHAPE[0] * SHAPE[1] * DENSITIES[density] / area_scale)
    counts = (5.0 * psf / 1.5 * np.sqrt(background / 0.3), 500.0 * psf / 1.5)
    return simulated_sky(
        SHAPE,
        background_error=error,
        n_sources=n,
        seed=seed,
        psf_sigma=psf,
        binsz=BINSZ,
        source_counts=counts,
        background_level=background,
        min_separation=1.5 * psf,
        margin=3 * psf,
    )


def detect(maps, psf: float, k: float, separation: float | None = None):
    kernels = cwtflow.CWTKernels(2, k * psf, 2.0)
    result = cwtflow.CWT(kernels).analyze(maps)
    sep = None if separation is None else separation * psf * BINSZ * u.deg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cwtflow.find_sources(
            result,
            psf=psf * BINSZ * u.deg,
            min_significance=3.0,
            min_separation=sep,
            fit_extension=False,
        )


def score(tables, truths, psf: float) -> tuple[float, float, int, int]:
    """Completeness at the TS threshold of the fixed false rate; (completeness, threshold,
    false detections, true sources)."""
    radius = max(2.0 * psf, 2.0)
    ts_real, ts_false, found_ts = [], [], []
    n_true = 0
    for table, truth in zip(tables, truths, strict=True):
        x, y = np.asarray(table["x"].value), np.asarray(table["y"].value)
        tx, ty = np.asarray(truth["x"].value), np.asarray(truth["y"].value)
        ts = np.asarray(table["ts"].value)
        n_true += len(truth)
        if len(table) == 0:
            continue
        d = np.hypot(x[:, None] - tx[None], y[:, None] - ty[None])
        real = d.min(axis=1) <= radius
        ts_false.append(ts[~real])
        # best TS of a detection matching each true source
        best = np.where(d <= radius, ts[:, None], -np.inf).max(axis=0)
        found_ts.append(best)
        ts_real.append(ts[real])
    false = np.concatenate(ts_false) if ts_false else np.zeros(0)
    best = np.concatenate(found_ts) if found_ts else np.zeros(0)
    beams = len(tables) * SHAPE[0] * SHAPE[1] / (4 * np.pi * psf**2)
    allowed = FALSE_PER_BEAM * beams
    order = np.sort(false)[::-1]
    n_allowed = int(np.floor(allowed))
    threshold = 9.0 if order.size <= n_allowed else max(9.0, float(order[n_allowed]) + 1e-9)
    completeness = float(np.mean(best >= threshold)) if n_true else np.nan
    return completeness, threshold, int((false >= threshold).sum()), n_true


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--seeds", type=int, default=3, help="maps per configuration")
    args = parser.parse_args(argv)
    rows = []
    grid = itertools.product(PSFS, BACKGROUNDS, DENSITIES, BACKGROUND_ERRORS)
    for psf, background, density, error in grid:
        sims = [simulate(psf, background, density, 1000 + s, error) for s in range(args.seeds)]
        for k in KS:
            tables = [detect(m, psf, k) for m, _ in sims]
            comp, thr, nfalse, ntrue = score(tables, [t for _, t in sims], psf)
            rows.append(("kernel", psf, background, density, error, k, 2.0, comp, thr))
            rows[-1] += (nfalse, ntrue)
            print(rows[-1], flush=True)
        if density == "crowded" and error == 0:
            for sep in SEPARATIONS:
                tables = [detect(m, psf, 1.0, sep) for m, _ in sims]
                comp, thr, nfalse, ntrue = score(tables, [t for _, t in sims], psf)
                rows.append(("separation", psf, background, density, error, 1.0, sep, comp, thr))
                rows[-1] += (nfalse, ntrue)
                print(rows[-1], flush=True)
    names = ("scan", "psf_sigma_pix", "background", "density", "background_error")
    names += ("min_scale_per_sigma",)
    names += ("min_separation_per_sigma", "completeness", "ts_threshold", "false", "true")
    table = Table(rows=rows, names=names)
    args.out.mkdir(parents=True, exist_ok=True)
    table.write(args.out / "psf_rule.ecsv", overwrite=True)
    plot(table, args.out / "psf_rule.png")
    return 0


def plot(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    colours = dict(zip(PSFS, ("C0", "C1", "C2"), strict=True))
    styles = {(0.3, "sparse"): "-o", (1.0, "sparse"): "--s", (0.3, "crowded"): ":^"}
    styles[(1.0, "crowded")] = "-.v"
    panels = (
        ("kernel", 0.0, axes[0], "min_scale_per_sigma", "kernel scale, exact background"),
        ("kernel", 0.1, axes[1], "min_scale_per_sigma", "kernel scale, background off by 10 %"),
        ("separation", 0.0, axes[2], "min_separation_per_sigma", "minimum separation (crowded)"),
    )
    for scan, error, ax, key, title in panels:
        rows = table[(table["scan"] == scan) & (table["background_error"] == error)]
        for psf, background, density in itertools.product(PSFS, BACKGROUNDS, DENSITIES):
            sel = (
                (rows["psf_sigma_pix"] == psf)
                & (rows["background"] == background)
                & (rows["density"] == density)
            )
            if not sel.any():
                continue
            ax.plot(
                rows[key][sel],
                rows["completeness"][sel],
                styles[(background, density)],
                color=colours[psf],
                alpha=0.7,
                label=f"PSF {psf:g} px, bkg {background:g}, {density}",
            )
        values = np.unique(rows[key])
        pooled = [
            np.sum(rows["completeness"][rows[key] == v] * rows["true"][rows[key] == v])
            / np.sum(rows["true"][rows[key] == v])
            for v in values
        ]
        ax.plot(values, pooled, "k-", lw=3, label="all configurations pooled")
        ax.set_ylabel(f"completeness at {FALSE_PER_BEAM:g} false / PSF beam")
        ax.set_title(title)
    axes[0].set_xlabel("smallest kernel scale / PSF sigma")
    axes[1].set_xlabel("smallest kernel scale / PSF sigma")
    axes[2].set_xlabel("minimum separation / PSF sigma")
    axes[0].legend(fontsize=6)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
