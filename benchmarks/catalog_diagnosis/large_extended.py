"""Sources larger than the catalog's extension model: fragments counted as false detections.

The catalog fits a Gaussian extension of at most ``MAX_EXTENSION_PER_SIGMA`` (2) PSF sigmas
(`cwtflow.psf`). Real skies hold larger sources (supernova remnants and pulsar wind nebulae of
0.5-1 deg at a 0.15 deg PSF). This script simulates skies (`cwtflow.simulate_sky`, 120 x 1000
px of 0.1 deg, 0.5 counts/px on the crest, 40 sources of 30-1500 counts of which 8 extended)
whose extended sources have an intrinsic sigma drawn from a range given in PSF sigmas, runs
the PSF-only detection of `bench_catalog.py` (CWT, then `find_sources` at its default
threshold) and counts, over the maps:

- false detections: no true source within max(2 sigma, 2 px);
- fragments: the false ones within 3 intrinsic sigmas of an extended source's centre;
- extended and point sources found (a detection within max(2 sigma, 2 px) of the centre).

Run from the project root::

    python benchmarks/catalog_diagnosis/large_extended.py            # PSF 1.5 and 2.5 px
    python benchmarks/catalog_diagnosis/large_extended.py --maps 3 --psf 1.5
    python benchmarks/catalog_diagnosis/large_extended.py --crowded --no-merge

``--crowded``: 80 sources at least max(4 sigma, 5 px) apart (point sources on the flanks of
the extended ones); ``--no-merge``: the catalog without its merge of larger sources
(`cwtflow.merge`), for the comparison.

With ``--survey`` it also lists the survey map's detections in the scoring region without a
3FHL source within 0.3 deg, with their fitted extension (a diagnosis of that map, not a rule:
the rule must come from the simulations).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_catalog import MATCH_RADIUS, cwt_catalog, in_region
from loaders import default_data_dir, reference_sources, survey_maps

import cwtflow
import cwtflow.catalog

#: Intrinsic sigma of the extended sources, in PSF sigmas: within the extension model, beyond.
RANGES = {
    "within (0.7-2 sigma)": (0.7, 2.0),
    "beyond (2.7-6.7 sigma)": (2.7, 6.7),
    "far beyond (6.7-13 sigma)": (6.7, 13.0),
}


def score(
    psf: float, sizes: tuple[float, float], maps: int, crowded: bool = False
) -> dict[str, int]:
    """Counts over ``maps`` skies with PSF sigma ``psf`` px and extensions ``sizes`` sigmas;
    ``crowded``: 80 sources (8 extended) at least max(4 sigma, 5 px) apart, so that point
    sources sit on the flanks of the extended ones, as in the Galactic plane."""
    out = dict.fromkeys(("detections", "false", "fragments", "ext", "ext_found", "pts"), 0)
    out["pts_found"] = 0
    radius = max(2.0 * psf, 2.0)
    for seed in range(300, 300 + maps):
        sky, truth = cwtflow.simulate_sky(
            (120, 1000),
            n_sources=80 if crowded else 40,
            n_extended=8,
            extent=(sizes[0] * psf, sizes[1] * psf),
            seed=seed,
            psf_sigma=psf,
            binsz=0.1,
            background_level=0.5,
            source_counts=(30.0, 1500.0),
            min_separation=max(4.0 * psf, 5.0) if crowded else 25.0,
            margin=15.0,
        )
        table, *_ = cwt_catalog(sky, {"psf": f"{0.1 * psf}deg"})
        x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
        tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
        extent = np.asarray(truth["extent"], float)
        extended = extent > 0
        d = np.hypot(x[:, None] - tx[None], y[:, None] - ty[None])
        false = d.min(axis=1) > radius if len(x) else np.zeros(0, bool)
        near = (d[:, extended] < 3.0 * extent[extended]).any(axis=1)
        found = (d < radius).any(axis=0)
        out["detections"] += len(x)
        out["false"] += int(false.sum())
        out["fragments"] += int((false & near).sum())
        out["ext"] += int(extended.sum())
        out["ext_found"] += int(found[extended].sum())
        out["pts"] += int((~extended).sum())
        out["pts_found"] += int(found[~extended].sum())
    return out


def survey(data: Path) -> None:
    """The survey's unmatched detections in the scoring region (0.3 deg from any 3FHL)."""
    maps = survey_maps(data)
    if maps is None:
        print("survey map not found; skipped")
        return
    table, *_ = cwt_catalog(maps)
    coords = table["sky_centroid"].galactic
    reference = reference_sources(data)
    nearest = coords[:, None].separation(reference[None, :]).deg.min(axis=1)
    inside = in_region(coords)
    false = inside & (nearest > MATCH_RADIUS)
    print(f"survey: {int(inside.sum())} detections in the region, {int(false.sum())} unmatched")
    for i in np.flatnonzero(false):
        print(
            f"  l {coords[i].l.wrap_at(180 * u.deg).deg:7.2f} b {coords[i].b.deg:5.2f}  "
            f"nearest 3FHL {nearest[i]:.2f} deg  "
            f"significance {float(table['significance'][i]):5.2f}"
            f"  extension {table['extension'][i].to_value(u.deg):.2f} deg  "
            f"ts_ext {float(table['ts_ext'][i]):6.1f}"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, default=6)
    parser.add_argument("--psf", type=float, nargs="+", default=[1.5, 2.5], help="PSF sigma, px")
    parser.add_argument("--crowded", action="store_true", help="point sources on the flanks too")
    parser.add_argument("--no-merge", action="store_true", help="switch cwtflow.merge off")
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[0, 1], help="rows of RANGES (0 within, 1, 2)"
    )
    parser.add_argument("--survey", action="store_true")
    parser.add_argument("--data", type=Path, default=default_data_dir())
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.no_merge:
        cwtflow.catalog.AT_CAP = np.inf  # no extension reaches it: nothing is tried
    print("PSF px | extended sources | detections | false | fragments | ext found | pts found")
    for psf in args.psf:
        for n, (label, sizes) in enumerate(RANGES.items()):
            if n not in args.sizes:
                continue
            r = score(psf, sizes, args.maps, args.crowded)
            print(
                f"{psf} | {label} | {r['detections']} | {r['false']} | {r['fragments']} | "
                f"{r['ext_found']}/{r['ext']} | {r['pts_found']}/{r['pts']}",
                flush=True,
            )
    if args.survey:
        survey(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
