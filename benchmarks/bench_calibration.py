"""Calibration of the catalog's columns on simulations with known truth.

    python benchmarks/bench_calibration.py --out docs     # calibration.ecsv/json + PNG

Everything with the PSF-driven settings only (`CWTKernels.from_psf`, ``find_sources(psf=)``):

(1) pulls: point sources (30-500 counts, dN/dS ~ S^-2) on the simulated diffuse sky, PSF sigma
    1.5, 2.5 and 4 px; for each detection matched to a true source (within 2 PSF sigmas) the
    per-axis position pulls ``(x - x_true) / x_err`` and the counts pull ``(counts -
    counts_true) / counts_err``; median |pull| (0.674 for a unit Gaussian) and rms (1).
(2) false detections on pure-background skies (no source; background 0.3 and 1 count per pixel
    on the crest), per square degree above significance thresholds 3.5 .. 7, against the
    expected number of local maxima above u of a smooth Gaussian random field with the
    PSF-matched filter's smoothness (Euler-characteristic density,
    ``lambda / (2 pi)^(3/2) u exp(-u^2/2)`` per unit area, ``lambda = 1 / (2 sigma^2)``, sigma
    the pixel-integrated PSF's sigma): the "stated significance" u implies a local p-value
    Phi(-u); the trials factor per unit area is the ratio.
(3) extension: sources of intrinsic Gaussian sigma 1, 2, 3 px (and point sources), 150-600
    counts, PSF sigma 1.5 and 2.5 px: fitted extension against truth, its pulls, and the
    fraction flagged extended.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import Table
from scipy.stats import norm

import cwtflow

BINSZ = 0.1
SHAPE = (120, 1000)
THRESHOLDS = (3.5, 4.0, 4.5, 5.0, 6.0, 7.0)


def catalog(maps, psf_pix: float, min_significance: float = 5.0, fit_extension: bool = True):
    psf = psf_pix * BINSZ * u.deg
    kernels = cwtflow.CWTKernels.from_psf(psf, BINSZ * u.deg)
    result = cwtflow.CWT(kernels, psf=psf).analyze(maps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cwtflow.find_sources(
            result, min_significance=min_significance, fit_extension=fit_extension
        )


def match(table, truth, radius):
    x, y = np.asarray(table["x"].value), np.asarray(table["y"].value)
    tx, ty = np.asarray(truth["x"].value), np.asarray(truth["y"].value)
    if len(table) == 0 or len(truth) == 0:
        return np.zeros(len(table), int), np.zeros(len(table), bool)
    d = np.hypot(x[:, None] - tx[None], y[:, None] - ty[None])
    j = d.argmin(axis=1)
    return j, d.min(axis=1) <= radius


def pulls(n_maps: int) -> dict:
    out = {}
    for psf in (1.5, 2.5, 4.0):
        px, fx = [], []
        for seed in range(n_maps):
            scale = psf / 1.5
            maps, truth = cwtflow.simulate_sky(
                SHAPE,
                n_sources=round(60 / scale**2),
                seed=500 + seed,
                psf_sigma=psf,
                source_counts=(30 * scale, 500 * scale),
                background_level=0.5,
                min_separation=4 * psf,
                margin=4 * psf,
            )
            table = catalog(maps, psf, fit_extension=False)
            j, ok = match(table, truth, 2 * psf)
            for axis in ("x", "y"):
                err = table[f"{axis}_err"].value[ok]
                px.append((table[axis].value[ok] - truth[axis].value[j[ok]]) / err)
            fx.append(
                (table["source_counts"].value[ok] - truth["counts"].value[j[ok]])
                / table["source_counts_err"].value[ok]
            )
        px, fx = np.concatenate(px), np.concatenate(fx)
        out[psf] = {"position": px, "counts": fx}
        print(
            f"pulls PSF {psf} px: position n={px.size} median|p| {np.median(abs(px)):.3f} "
            f"rms {np.sqrt(np.mean(px**2)):.3f}; counts n={fx.size} median|p| "
            f"{np.median(abs(fx)):.3f} rms {np.sqrt(np.mean(fx**2)):.3f} mean {fx.mean():.3f}",
            flush=True,
        )
    return out


def expected_peaks_per_deg2(u_: np.ndarray, psf_pix: float) -> np.ndarray:
    """Local maxima above u per deg2 of a Gaussian field smoothed by the matched filter."""
    sigma2 = psf_pix**2 + 1 / 12  # pixel-integrated Gaussian
    lam = 1 / (2 * sigma2)
    per_px = lam / (2 * np.pi) ** 1.5 * u_ * np.exp(-(u_**2) / 2)
    return per_px / BINSZ**2


def false_rates(n_maps: int) -> list[dict]:
    rows = []
    for psf in (1.5, 2.5):
        for level in (0.3, 1.0):
            sig = []
            for seed in range(n_maps):
                maps, _ = cwtflow.simulate_sky(
                    SHAPE, n_sources=0, seed=900 + seed, psf_sigma=psf, background_level=level
                )
                table = catalog(maps, psf, min_significance=min(THRESHOLDS), fit_extension=False)
                sig.append(np.asarray(table["significance"].value))
            sig = np.concatenate(sig)
            area = n_maps * SHAPE[0] * SHAPE[1] * BINSZ**2
            for t in THRESHOLDS:
                n = int((sig >= t).sum())
                expected = float(expected_peaks_per_deg2(np.array(t), psf)) * area
                rows.append(
                    {
                        "psf_sigma_pix": psf,
                        "background": level,
                        "threshold": t,
                        "area_deg2": area,
                        "false": n,
                        "false_per_deg2": n / area,
                        "expected": expected,
                        "expected_per_deg2": expected / area,
                        "local_p": float(norm.sf(t)),
                        "trials_per_deg2": expected / area / float(norm.sf(t)),
                    }
                )
                r = rows[-1]
                print(
                    f"false PSF {psf} bkg {level} >= {t}: {n} in {area:.0f} deg2 "
                    f"(expected {expected:.2f}; trials/deg2 {r['trials_per_deg2']:.1f})",
                    flush=True,
                )
    return rows


def extension(n_maps: int) -> list[dict]:
    rows = []
    for psf in (1.5, 2.5):
        for ext in (0.0, 1.0, 2.0, 3.0):
            fitted, errs, flags = [], [], []
            for seed in range(n_maps):
                maps, truth = cwtflow.simulate_sky(
                    SHAPE,
                    n_sources=20,
                    n_extended=20 if ext else 0,
                    extent=(ext, ext) if ext else (1.0, 1.0),
                    seed=700 + seed,
                    psf_sigma=psf,
                    source_counts=(150.0, 600.0),
                    background_level=0.5,
                    min_separation=8 * psf,
                    margin=6 * psf,
                )
                table = catalog(maps, psf)
                _, ok = match(table, truth, 2 * psf)
                fitted.append(table["extension"].to_value(u.deg)[ok] / BINSZ)
                errs.append(table["extension_err"].to_value(u.deg)[ok] / BINSZ)
                flags.append(np.asarray(table["extended"])[ok])
            e, s, f = np.concatenate(fitted), np.concatenate(errs), np.concatenate(flags)
            pull = (e - ext) / np.where(s > 0, s, np.nan)
            rows.append(
                {
                    "psf_sigma_pix": psf,
                    "true_extension_pix": ext,
                    "n": int(e.size),
                    "median_extension_pix": float(np.median(e)),
                    "median_error_pix": float(np.median(s)),
                    "median_abs_pull": float(np.nanmedian(abs(pull))),
                    "within_2_errors": float(np.nanmean(abs(pull) <= 2)),
                    "flagged_extended": float(f.mean()),
                }
            )
            print(rows[-1], flush=True)
    return rows


def plot(pull: dict, false: list[dict], ext: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    grid = np.linspace(-5, 5, 201)
    bins = np.linspace(-5, 5, 41)
    for psf, p in pull.items():
        axes[0].hist(
            np.clip(p["position"], -5, 5),
            bins,
            density=True,
            histtype="step",
            label=f"position, PSF {psf:g} px",
        )
        axes[0].hist(
            np.clip(p["counts"], -5, 5),
            bins,
            density=True,
            histtype="step",
            linestyle="--",
            label=f"counts, PSF {psf:g} px",
        )
    axes[0].plot(grid, norm.pdf(grid), "k:", label="unit Gaussian")
    axes[0].set(xlabel="pull (fit - truth) / error", ylabel="density", title="pulls")
    axes[0].legend(fontsize=7)
    table = Table(rows=[list(r.values()) for r in false], names=list(false[0]))
    for (psf, level), colour in zip(
        [(1.5, 0.3), (1.5, 1.0), (2.5, 0.3), (2.5, 1.0)], ("C0", "C1", "C2", "C3"), strict=True
    ):
        sel = (table["psf_sigma_pix"] == psf) & (table["background"] == level)
        measured = np.maximum(table["false_per_deg2"][sel], 1e-7)
        axes[1].plot(
            table["threshold"][sel],
            measured,
            "o",
            color=colour,
            label=f"measured, PSF {psf:g} px, bkg {level:g}",
        )
        axes[1].plot(table["threshold"][sel], table["expected_per_deg2"][sel], "-", color=colour)
    axes[1].set(yscale="log", xlabel="significance threshold", ylabel="false detections / deg2")
    axes[1].set_title("pure background (lines: Gaussian-field expectation; 1e-7: none)")
    axes[1].legend(fontsize=7)
    et = Table(rows=[list(r.values()) for r in ext], names=list(ext[0]))
    for psf, colour in ((1.5, "C0"), (2.5, "C1")):
        sel = et["psf_sigma_pix"] == psf
        axes[2].errorbar(
            et["true_extension_pix"][sel],
            et["median_extension_pix"][sel],
            yerr=et["median_error_pix"][sel],
            fmt="o",
            color=colour,
            label=f"PSF {psf:g} px",
        )
    axes[2].plot([0, 3.2], [0, 3.2], "k:")
    axes[2].set(xlabel="true extension (px)", ylabel="fitted extension (px, median)")
    axes[2].set_title("extension recovery")
    axes[2].legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--maps", type=int, default=6, help="maps per configuration")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    p = pulls(args.maps)
    f = false_rates(2 * args.maps)
    e = extension(max(2, args.maps // 2))
    summary = {
        "pulls": {
            str(psf): {
                kind: {
                    "n": int(v.size),
                    "median_abs": float(np.median(abs(v))),
                    "rms": float(np.sqrt(np.mean(v**2))),
                    "mean": float(np.mean(v)),
                }
                for kind, v in d.items()
            }
            for psf, d in p.items()
        },
        "false": f,
        "extension": e,
    }
    (args.out / "calibration.json").write_text(json.dumps(summary, indent=1))
    plot(p, f, e, args.out / "calibration.png")
    print(json.dumps(summary["pulls"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
