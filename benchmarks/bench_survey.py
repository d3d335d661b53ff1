"""Full-sky survey benchmark: a simulated sky at 0.1 deg with Fermi-like statistics (diffuse
Galactic-like background + point sources as an event list), run with 1 and 2 worker processes.

A fraction of the patches is measured (``--patches``, spread over the sky) and the whole sky
extrapolated from the measured cost per patch pixel; reported: wall time, peak RSS of the
driver and of the workers, patches per minute.

    python benchmarks/bench_survey.py --patches 24 --workers 1 2
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from astropy.table import Table

from cwtflow.cluster import open_client
from cwtflow.sky import SkyPartition
from cwtflow.survey import Survey
from cwtflow.survey_patch import PatchJob, run_patch
from cwtflow.survey_sim import simulate_allsky
from cwtflow.survey_store import create_survey_store


def sources(n: int, seed: int) -> Table:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    glon = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360
    glat = np.degrees(np.arcsin(v[:, 2]))
    counts = 30 * (1 - rng.uniform(size=n)) ** (-1 / 1.5)  # logN-logS, >= 30 photons
    return Table({"glon": glon, "glat": glat, "counts": np.minimum(counts, 5000)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binsz", type=float, default=0.1)
    parser.add_argument("--psf", type=float, default=0.15)
    parser.add_argument("--diffuse", type=float, default=8e5)
    parser.add_argument("--n-sources", type=int, default=1000)
    parser.add_argument("--patches", type=int, default=24, help="patches measured (0: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-iter", type=int, default=10)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-survey-"))
    t0 = time.perf_counter()
    sim = simulate_allsky(
        folder / "in",
        sources(args.n_sources, 1),
        psf_sigma=args.psf,
        diffuse_counts=args.diffuse,
        nside=256,
        seed=2,
    )
    from astropy.io import fits

    with fits.open(sim["events"]) as hdul:
        n_events = len(hdul[1].data)
    print(
        f"simulated {n_events} events, {args.n_sources} sources in {time.perf_counter() - t0:.1f} s"
    )
    survey = Survey(binsz=args.binsz, psf_sigma=args.psf, max_iter=args.max_iter)
    part: SkyPartition = survey.partition
    print(
        f"partition: nside {part.nside}, {part.npatch} patches, margin {part.margin} px, "
        f"{part.pixels / 1e6:.1f} Mpix in patches (overhead {part.overhead:.2f}), corner "
        f"distortion {part.max_scale_distortion:.3%}"
    )
    settings, inputs = survey.check_inputs(sim["events"], sim["background"], sim["exposure"])
    chosen = list(range(part.npatch))
    if args.patches:
        chosen = list(np.linspace(0, part.npatch - 1, args.patches).round().astype(int))
    measured_pixels = sum(np.prod(part.patches[i].shape) for i in chosen)
    for workers in args.workers:
        out = folder / f"sky-{workers}.zarr"
        create_survey_store(out, part, settings.to_dict(), inputs, resume=False, overwrite=False)
        jobs = [
            PatchJob(part.patches[i], part.to_dict(), settings, str(out), False) for i in chosen
        ]
        with open_client(workers=workers, memory_limit="4GiB") as client:
            client.run(lambda: None)
            start = time.perf_counter()
            futures = [client.submit(run_patch, job, pure=False) for job in jobs]
            rows = client.gather(futures)
            wall = time.perf_counter() - start
            worker_rss = client.run(lambda: psutil.Process().memory_info().rss)
        peak_worker = max(r["maxrss_mb"] for r in rows)
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rate = len(jobs) / wall * 60
        full = wall * part.pixels / measured_pixels
        print(
            f"workers {workers}: {len(jobs)} patches ({measured_pixels / 1e6:.2f} Mpix) in "
            f"{wall:.1f} s = {rate:.1f} patches/min; peak RSS driver {driver:.0f} MB, workers "
            f"{peak_worker:.0f} MB (now {max(worker_rss.values()) / 2**20:.0f} MB); whole sky "
            f"({part.npatch} patches) extrapolated {full / 60:.1f} min; "
            f"{wall / measured_pixels * 1e6:.2f} s per Mpix per worker-set"
        )
        its = [r["iterations"] for r in rows]
        print(
            f"  iterations per patch: mean {np.mean(its):.1f}, "
            f"sources {sum(r['sources'] for r in rows)}"
        )


if __name__ == "__main__":
    main()
