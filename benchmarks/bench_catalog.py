"""Source catalog scoring: simulations with ground truth, the Fermi survey against 3FHL, the peer.

Run from the project root, with the benchmark virtualenv so that the peer (gammapy) runs in the
same process (see ``benchmarks/README.md``)::

    /work/bench-venv/bin/python benchmarks/bench_catalog.py --out /tmp/bench-catalog

Without gammapy the cwtflow parts run and the report says the peer was skipped.

Three parts; every cwtflow run is given the PSF only (`SETTINGS`, the API equivalent of
``cwtflow run MAPS --psf 0.15deg`` then ``cwtflow catalog``):

(a) simulations (`cwtflow.simulate_sky` through ``loaders.simulated_sky``: Galactic-plane-like
    diffuse emission, point sources and slightly extended ones, a survey-like 0.1 deg grid and
    0.15 deg PSF) with ground truth:
    completeness against true flux and the false-detection fraction against measured flux, for
    cwtflow and the peer at 5 and 4 sigma, found sources and false detections per deg2 at
    thresholds 4, 5, 6, 7 for both, once with the true background
    and once with a background model off by a smooth 10 % rms field (the real survey's diffuse
    model is not exact either). A table and a PNG plot.
(b) the Fermi-LAT survey map (the sample data folder, ``--data``) scored against the 3FHL
    catalog: a detection matches a 3FHL source within 0.3 deg; only the region |l| < 99.5 deg,
    |b| < 4.5 deg counts.
    recall = 3FHL sources in the region with a detection within 0.3 deg / their number;
    purity = detections in the region with a 3FHL source within 0.3 deg / their number.
(c) the peer on the same maps in the same run: gammapy ``TSMapEstimator`` with a Gaussian kernel
    (sigma 0.15 deg, power law index 2) on counts, background and exposure, then ``find_peaks``
    at sqrt(TS) > 5 with 0.3 deg minimum distance. Timing: cwtflow detection is CWT.analyze plus
    find_sources with its likelihood refinement (median of 3 runs); the peer is the TS map
    estimate (one run).

The kernels, template, separation and extension model come from the PSF rule, derived on
other simulations by ``benchmarks/psf_rule.py`` (docs/psf_rule.md); the columns' calibration is
``benchmarks/bench_calibration.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from loaders import add_data_argument, reference_sources, simulated_sky, survey_maps

import cwtflow

MATCH_RADIUS = 0.3  # deg
REGION = (99.5, 4.5)  # |l|, |b| limits in deg

#: cwtflow settings for every run of this benchmark: the PSF only (``cwtflow run --psf 0.15deg``
#: then ``cwtflow catalog``); kernels, template, separation and extension model follow from it
#: by the rule of docs/psf_rule.md, the catalog threshold is find_sources' default (5).
SETTINGS: dict[str, Any] = {"psf": "0.15deg"}

#: simulated skies: survey-like grid (0.1 deg pixels), PSF sigma 0.15 deg, ~80 sources / 1000 deg2
SIM = {
    "shape": (100, 1000),
    "n_sources": 80,
    "psf_sigma": 1.5,
    "source_counts": (5.0, 500.0),
    "n_extended": 16,
    "extent": (1.0, 3.0),
    "background_level": 0.8,
    "min_separation": 3.0,
    "margin": 5.0,
}
#: a second, lower catalog threshold on the simulations, to show the false-detection side
LOW_SIGNIFICANCE = 4.0
LOW_LABEL = "cwtflow 4 sigma"
BACKGROUND_ERROR = 0.1  # rms of the smooth relative error of the "realistic" background model
FLUX_BINS = np.array([0.5, 1, 2, 4, 8, 16, 50]) * 1e-10  # cm-2 s-1 (5 .. 500 counts at 1e11)


# --- cwtflow --------------------------------------------------------------------------------


def cwt_catalog(
    maps, settings: dict[str, Any] = SETTINGS, min_significance: float | None = None
) -> tuple[Table, float, float]:
    """cwtflow detection on ``maps`` with the PSF alone (the API equivalent of ``cwtflow run
    --psf``, then ``cwtflow catalog``): the catalog and the seconds spent in CWT and catalog
    (likelihood refinement included)."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    psf = u.Quantity(settings["psf"])
    wcs = cwtflow.wcs_from_attrs(maps.attrs)
    pixel = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * u.deg
    t0 = time.perf_counter()
    cwt = cwtflow.CWT(cwtflow.CWTKernels.from_psf(psf, pixel), psf=psf)
    result = cwt.analyze(maps)
    t1 = time.perf_counter()
    options = {} if min_significance is None else {"min_significance": min_significance}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = cwtflow.find_sources(result, **options)
    t2 = time.perf_counter()
    return table, t1 - t0, t2 - t1


# --- the peer -------------------------------------------------------------------------------


def peer_available() -> str | None:
    """gammapy's version, or None when it does not import."""
    try:
        import gammapy
    except ImportError:
        return None
    return str(gammapy.__version__)


def peer_catalog(maps, threshold: float = 5.0) -> tuple[Table, float]:
    """TS map (Gaussian sigma 0.15 deg, power law index 2) and peaks at sqrt(TS) > threshold,
    0.3 deg apart; returns the peaks (x, y, lon, lat, sqrt_ts, flux) and the TS map's seconds."""
    from gammapy.datasets import MapDataset
    from gammapy.estimators import TSMapEstimator
    from gammapy.estimators.utils import find_peaks
    from gammapy.maps import Map, MapAxis, WcsGeom
    from gammapy.modeling.models import GaussianSpatialModel, PowerLawSpectralModel, SkyModel

    wcs = cwtflow.wcs_from_attrs(maps.attrs)
    ny, nx = maps.sizes["y"], maps.sizes["x"]
    edges = [10, 2000] * u.GeV  # the survey: photons above 10 GeV
    reco = MapAxis.from_energy_edges(edges, name="energy")
    true = MapAxis.from_energy_edges(edges, name="energy_true")
    geom = WcsGeom(wcs=wcs, npix=(nx, ny), axes=[reco])
    geom_true = WcsGeom(wcs=wcs, npix=(nx, ny), axes=[true])
    dataset = MapDataset(
        counts=Map.from_geom(geom, data=maps["counts"].values[None].astype(float)),
        background=Map.from_geom(geom, data=maps["background"].values[None].astype(float)),
        exposure=Map.from_geom(
            geom_true, data=maps["exposure"].values[None].astype(float), unit="cm2 s"
        ),
    )
    kernel = SkyModel(
        spatial_model=GaussianSpatialModel(sigma="0.15 deg"),
        spectral_model=PowerLawSpectralModel(index=2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        result = TSMapEstimator(kernel, energy_edges=edges).run(dataset)
        seconds = time.perf_counter() - t0
        peaks = find_peaks(
            result["sqrt_ts"], threshold=threshold, min_distance=MATCH_RADIUS * u.deg
        )
    out = Table()
    if len(peaks) == 0:
        for name in ("x", "y", "lon", "lat", "sqrt_ts", "flux"):
            out[name] = np.zeros(0)
        return out, seconds
    x, y = np.asarray(peaks["x"], dtype=int), np.asarray(peaks["y"], dtype=int)
    sky = wcs.pixel_to_world(x, y)
    flux = np.asarray(result["flux"].quantity.to_value("cm-2 s-1")).reshape(-1, ny, nx)[0]
    out["x"], out["y"] = x.astype(float), y.astype(float)
    out["lon"], out["lat"] = sky.spherical.lon.deg, sky.spherical.lat.deg
    out["sqrt_ts"] = np.asarray(peaks["value"], dtype=float)
    out["flux"] = flux[y, x]
    return out, seconds


# --- (a) simulations ------------------------------------------------------------------------


def match_sim(det_x, det_y, truth: Table, radius_pix: float) -> tuple[np.ndarray, np.ndarray]:
    """(true source found, detection true) within ``radius_pix``."""
    if len(det_x) == 0:
        return np.zeros(len(truth), bool), np.zeros(0, bool)
    d = np.hypot(
        np.asarray(det_x)[:, None] - np.asarray(truth["x"])[None],
        np.asarray(det_y)[:, None] - np.asarray(truth["y"])[None],
    )
    return d.min(axis=0) <= radius_pix, d.min(axis=1) <= radius_pix


def _values(column) -> np.ndarray:
    return np.asarray(getattr(column, "value", column), dtype=float)


def run_simulations(
    n_maps: int, with_peer: bool, settings: dict[str, Any] = SETTINGS, log=print
) -> dict[str, Any]:
    """Detections on ``n_maps`` skies per background case, scored against the truth. Both
    detectors run down to significance 4 (`LOW_SIGNIFICANCE`); `thresholds_table` cuts at
    4 .. 7, the rest at 5 (both defaults) and 4."""
    radius = MATCH_RADIUS / 0.1
    out: dict[str, Any] = {}
    for case, error in (("exact background", 0.0), ("background off by 10 %", BACKGROUND_ERROR)):
        raw = {"cwtflow": [], "peer": []}
        for k in range(n_maps):
            maps, truth = simulated_sky(seed=200 + k, background_error=error, **SIM)
            low, *_ = cwt_catalog(maps, settings, min_significance=LOW_SIGNIFICANCE)
            raw["cwtflow"].append((truth, low["x"], low["y"], low["flux"], low["significance"]))
            if with_peer:
                peaks, _ = peer_catalog(maps, threshold=LOW_SIGNIFICANCE)
                raw["peer"].append((truth, peaks["x"], peaks["y"], peaks["flux"], peaks["sqrt_ts"]))
            log(f"  sim {case} #{k}: cwtflow {int((_values(low['significance']) >= 5).sum())}")
        out[case] = {}
        for name, runs in raw.items():
            if not runs:
                continue
            for threshold in (4.0, 5.0, 6.0, 7.0):
                per = []
                for truth, x, y, flux, sig in runs:
                    keep = _values(sig) >= threshold
                    found, real = match_sim(_values(x)[keep], _values(y)[keep], truth, radius)
                    per.append((_values(truth["flux"]), found, _values(flux)[keep], real))
                label = name if threshold == 5.0 else f"{name} {threshold:g} sigma"
                out[case][label] = {
                    "true_flux": np.concatenate([r[0] for r in per]),
                    "found": np.concatenate([r[1] for r in per]),
                    "det_flux": np.concatenate([r[2] for r in per]),
                    "real": np.concatenate([r[3] for r in per]),
                    "threshold": threshold,
                    "method": name,
                    "area_deg2": len(runs) * SIM["shape"][0] * SIM["shape"][1] * 0.01,
                }
    return out


def thresholds_table(sims: dict[str, Any]) -> Table:
    """Found sources and false detections per deg2 against the threshold, per method."""
    rows = []
    for case, methods in sims.items():
        for s in methods.values():
            false = int((~s["real"]).sum())
            rows.append(
                (
                    case,
                    s["method"],
                    s["threshold"],
                    int(s["found"].sum()),
                    int(s["found"].size),
                    int(s["real"].size),
                    false,
                    false / s["area_deg2"],
                )
            )
    names = ("case", "method", "threshold", "found", "true_sources", "detections", "false")
    return Table(rows=rows, names=(*names, "false_per_deg2"))


def binned(values: np.ndarray, flags: np.ndarray, bins: np.ndarray) -> tuple[list, list]:
    """Fraction of ``flags`` and count per bin of ``values``."""
    frac, count = [], []
    for lo, hi in itertools.pairwise(bins):
        sel = (values >= lo) & (values < hi)
        count.append(int(sel.sum()))
        frac.append(float(flags[sel].mean()) if sel.any() else math.nan)
    return frac, count


def sim_table(sims: dict[str, Any]) -> Table:
    """Completeness per true-flux bin and false fraction per measured-flux bin."""
    rows = []
    for case, methods in sims.items():
        for name, s in methods.items():
            comp, n_true = binned(s["true_flux"], s["found"], FLUX_BINS)
            false, n_det = binned(s["det_flux"], ~s["real"], FLUX_BINS)
            for i in range(len(FLUX_BINS) - 1):
                rows.append(
                    (
                        case,
                        name,
                        FLUX_BINS[i],
                        FLUX_BINS[i + 1],
                        n_true[i],
                        comp[i],
                        n_det[i],
                        false[i],
                    )
                )
    return Table(
        rows=rows,
        names=(
            "case",
            "method",
            "flux_lo",
            "flux_hi",
            "n_true",
            "completeness",
            "n_detected",
            "false_fraction",
        ),
    )


def sim_totals(sims: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for case, methods in sims.items():
        for name, s in methods.items():
            out.append(
                {
                    "case": case,
                    "method": name,
                    "true_sources": int(s["found"].size),
                    "found": int(s["found"].sum()),
                    "detections": int(s["real"].size),
                    "false": int((~s["real"]).sum()),
                }
            )
    return out


def plot_sims(sims: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    centres = np.sqrt(FLUX_BINS[:-1] * FLUX_BINS[1:])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    styles = {"cwtflow": "-o", LOW_LABEL: ":^", "peer": "--s", "peer 4 sigma": "-.v"}
    colours = {"exact background": "C0", "background off by 10 %": "C3"}
    for case, methods in sims.items():
        for name, s in methods.items():
            if name not in styles:
                continue
            comp, _ = binned(s["true_flux"], s["found"], FLUX_BINS)
            false, _ = binned(s["det_flux"], ~s["real"], FLUX_BINS)
            label = f"{name}, {case}"
            axes[0].plot(centres, comp, styles[name], color=colours[case], label=label)
            axes[1].plot(centres, false, styles[name], color=colours[case], label=label)
    thresholds = thresholds_table(sims)
    for case in sims:
        for method, style in (("cwtflow", "-o"), ("peer", "--s")):
            sel = (thresholds["case"] == case) & (thresholds["method"] == method)
            if not sel.any():
                continue
            rate = np.maximum(np.asarray(thresholds["false_per_deg2"][sel], float), 1e-5)
            axes[2].plot(
                thresholds["threshold"][sel],
                rate,
                style,
                color=colours[case],
                label=f"{method}, {case}",
            )
    axes[0].set(xscale="log", xlabel="true flux (cm$^{-2}$ s$^{-1}$)", ylabel="completeness")
    axes[1].set(xscale="log", xlabel="measured flux (cm$^{-2}$ s$^{-1}$)")
    axes[1].set(ylabel="false-detection fraction")
    axes[2].set(yscale="log", xlabel="significance threshold", ylabel="false detections / deg2")
    axes[2].set_title("false detections (1e-5: none)")
    axes[2].legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(-0.01, 0.5)
    for ax in axes[:2]:
        ax.set_xlim(FLUX_BINS[0], FLUX_BINS[-1])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    axes[0].set_title("simulations: completeness")
    axes[1].set_title("simulations: false detections")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- (b) survey -----------------------------------------------------------------------------


def in_region(coords: SkyCoord) -> np.ndarray:
    lon = coords.l.wrap_at(180 * u.deg).deg
    return (np.abs(lon) < REGION[0]) & (np.abs(coords.b.deg) < REGION[1])


def score_survey(lon, lat, reference: SkyCoord) -> dict[str, Any]:
    """Recall and purity of detections at (lon, lat) (Galactic deg) against ``reference``."""
    ref_in = reference[in_region(reference)]
    det = SkyCoord(np.asarray(lon, float) * u.deg, np.asarray(lat, float) * u.deg, frame="galactic")
    det_in = det[in_region(det)] if len(det) else det
    out = {"detections": len(det), "detections_in_region": len(det_in), "reference": len(ref_in)}
    if len(det_in) == 0:
        out.update(recovered=0, matched_detections=0, one_to_one=0, recall=0.0, purity=math.nan)
        return out
    sep_in = det_in[:, None].separation(ref_in[None, :]).deg
    sep_all = det_in[:, None].separation(reference[None, :]).deg
    recovered = int((sep_in.min(axis=0) <= MATCH_RADIUS).sum())
    matched = int((sep_all.min(axis=1) <= MATCH_RADIUS).sum())
    # one-to-one pairs, closest first
    pairs = np.argwhere(sep_in <= MATCH_RADIUS)
    order = np.argsort(sep_in[pairs[:, 0], pairs[:, 1]])
    used_d, used_r, one = set(), set(), 0
    for i, j in pairs[order]:
        if i not in used_d and j not in used_r:
            used_d.add(i)
            used_r.add(j)
            one += 1
    out.update(
        recovered=recovered,
        matched_detections=matched,
        one_to_one=one,
        recall=recovered / len(ref_in),
        purity=matched / len(det_in),
    )
    return out


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the table, JSON and PNG")
    add_data_argument(parser)
    parser.add_argument("--sims", type=int, default=4, help="simulated maps per background case")
    parser.add_argument("--no-peer", action="store_true", help="skip gammapy even if installed")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    out.mkdir(parents=True, exist_ok=True)

    peer_version = None if args.no_peer else peer_available()
    print(f"cwtflow {cwtflow.__version__}; settings {json.dumps(SETTINGS)}")
    print(f"peer: {'gammapy ' + peer_version if peer_version else 'not run (gammapy missing)'}")
    report: dict[str, Any] = {"settings": SETTINGS, "peer": peer_version}

    print(f"(a) simulations: {args.sims} maps of {SIM['shape']} px per background case")
    sims = run_simulations(args.sims, peer_version is not None)
    table = sim_table(sims)
    table.write(out / "catalog_simulations.ecsv", overwrite=True)
    thresholds = thresholds_table(sims)
    thresholds.write(out / "catalog_thresholds.ecsv", overwrite=True)
    thresholds.pprint(max_lines=-1, max_width=-1)
    report["thresholds"] = [dict(zip(thresholds.colnames, r, strict=True)) for r in thresholds]
    plot_sims(sims, out / "catalog_completeness.png")
    report["simulations"] = sim_totals(sims)
    for row in report["simulations"]:
        print(
            f"  {row['case']:<24} {row['method']:<8} found {row['found']:>4}/{row['true_sources']}"
            f"  detections {row['detections']:>4}  false {row['false']:>3}"
        )
    table.pprint(max_lines=-1, max_width=-1)

    maps = survey_maps(args.data)
    if maps is None:
        print(f"(b) survey skipped: no survey map in {args.data}")
    else:
        reference = reference_sources(args.data)
        runs = [cwt_catalog(maps) for _ in range(3)]
        catalog = runs[0][0]
        cwt_s = statistics.median(r[1] for r in runs)
        cat_s = statistics.median(r[2] for r in runs)
        catalog.write(out / "catalog_survey_cwtflow.ecsv", overwrite=True)
        cwtflow.write_regions(catalog, out / "catalog_survey_cwtflow.reg", overwrite=True)
        ours = score_survey(_values(catalog["lon"]), _values(catalog["lat"]), reference)
        ours.update(cwt_seconds=cwt_s, catalog_seconds=cat_s, seconds=cwt_s + cat_s)
        report["survey_cwtflow"] = ours
        print(f"(b) survey, cwtflow: {json.dumps(ours)}")
        if peer_version:
            peaks, peer_s = peer_catalog(maps)
            peaks.write(out / "catalog_survey_peer.ecsv", overwrite=True)
            theirs = score_survey(peaks["lon"], peaks["lat"], reference)
            theirs.update(seconds=peer_s)
            report["survey_peer"] = theirs
            print(f"(c) survey, peer:    {json.dumps(theirs)}")
            speedup = peer_s / (cwt_s + cat_s)
            report["speedup"] = speedup
            verdict = {
                "recall at least 51/145": ours["recovered"] >= 51,
                "purity at least 0.89": ours["purity"] >= 0.89,
                "recall at least the peer's": ours["recovered"] >= theirs["recovered"],
                "purity at least the peer's": ours["purity"] >= theirs["purity"],
                "at least 20x faster": speedup >= 20,
            }
            report["targets"] = verdict
            print(f"    speed-up (peer TS map / cwtflow CWT + refined catalog): {speedup:.1f}x")
            for name, ok in verdict.items():
                print(f"    target {name}: {'met' if ok else 'NOT met'}")
    (out / "catalog_report.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
