"""Overhead of tiling: tiled (dask) vs in-memory CWT iterations with the same number of threads.

Run from the project root::

    python benchmarks/bench_tiled.py                 # 4096 x 4096, tiles 512, 1024 and 2048
    python benchmarks/bench_tiled.py --size 2048 --chunks 512 1024 --iterations 3 --repeat 1

The map is simulated (`cwtflow.simulate_sky`: Poisson counts over a smooth Galactic-band
background with PSF-blurred sources, fixed seed). The tutorial's settings: kernels n_scale 2,
min_scale 6.0, step_scale 1.3 (halo 41 px), significance threshold 2.0, isolated pixels
removed; ``tol=0`` so every run does exactly ``--iterations`` iterations. With ``--island T``
the island threshold is set too (the path that labels components across tiles).

Both paths get ``--threads`` threads (default 2): in memory ``CWT(fft_workers=threads)``, tiled
the dask threaded scheduler with ``num_workers=threads`` (one FFT thread per tile). Numeric
libraries are pinned to one thread. Runs are interleaved (memory, each tile size, then again)
and each figure is the best over ``--repeat`` rounds, wall clock (``time.perf_counter``):

- total: the whole ``CWT.analyze`` call (set-up, every iteration, the result materialised);
- per iteration: the median of iterations 2..N, timed between the public iteration callbacks;
- cpu: process CPU time of the whole call (all threads), the work done whatever the load of
  a shared machine.

The ratio tiled / in-memory is reported for both; the target is at most 1.3. The tiled result
is checked against the in-memory one (largest difference of the model, relative, and identical
support) so that a fast but wrong configuration cannot pass.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import dask  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from loaders import simulated_sky  # noqa: E402

import cwtflow  # noqa: E402

KERNELS = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}
THRESHOLD = 2.0
TARGET = 1.3


def run(
    data: xr.Dataset, *, chunks: int | None, threads: int, iterations: int, island: float | None
) -> tuple[dict, xr.Dataset]:
    """One ``analyze`` call; its total time, per-iteration times and final (numpy) state."""
    cwt = cwtflow.CWT(
        cwtflow.CWTKernels(**KERNELS),
        significance_threshold=THRESHOLD,
        significance_island_threshold=island,
        tol=0.0,
        max_iter=iterations,
        fft_workers=1 if chunks else threads,
    )
    stamps: list[float] = []
    with dask.config.set(scheduler="threads", num_workers=threads):
        cpu = time.process_time()
        start = time.perf_counter()
        state = cwt.analyze(
            data, chunks=chunks, callback=lambda _: stamps.append(time.perf_counter())
        )
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu
    per_iteration = list(np.diff([start, *stamps]))
    state = state.compute()  # the tiled state is already materialised: this only gathers it
    return {"total": total, "cpu": cpu, "iterations": per_iteration}, state


def compare(tiled: xr.Dataset, memory: xr.Dataset) -> dict:
    model = memory["model"].values
    diff = np.abs(tiled["model"].values - model).max() / np.abs(model).max()
    same_support = bool(np.array_equal(tiled["support"].values, memory["support"].values))
    return {"model_max_rel_diff": float(diff), "support_identical": same_support}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="map side in pixels")
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[512, 1024, 2048], help="tile sizes"
    )
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--island", type=float, default=None, help="island threshold")
    parser.add_argument("--seed", type=int, default=4096)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    # 0.04 deg pixels, so that the map stays off the poles
    maps, _ = simulated_sky((args.size, args.size), seed=args.seed, binsz=0.04)
    data = maps[["counts", "background"]]
    configs: list[int | None] = [None, *args.chunks]
    best: dict[int | None, dict] = {}
    checks: dict[int, dict] = {}
    for round_ in range(args.repeat):
        memory_state = None
        for chunks in configs:
            timing, state = run(
                data,
                chunks=chunks,
                threads=args.threads,
                iterations=args.iterations,
                island=args.island,
            )
            label = "memory" if chunks is None else f"tiles {chunks}"
            print(
                f"round {round_ + 1} {label:>12}: total {timing['total']:.2f} s "
                f"(cpu {timing['cpu']:.2f} s), iterations "
                + " ".join(f"{t:.2f}" for t in timing["iterations"]),
                flush=True,
            )
            if chunks is None:
                memory_state = state
            elif round_ == 0:
                checks[chunks] = compare(state, memory_state)
            steady = statistics.median(timing["iterations"][1:] or timing["iterations"])
            entry = {"total": timing["total"], "per_iteration": steady, "cpu": timing["cpu"]}
            previous = best.get(chunks)
            best[chunks] = (
                entry if previous is None else {k: min(v, previous[k]) for k, v in entry.items()}
            )
            del state

    memory = best[None]
    results = {
        "size": args.size,
        "iterations": args.iterations,
        "threads": args.threads,
        "island_threshold": args.island,
        "kernels": KERNELS,
        "memory": memory,
        "tiled": {},
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(
        f"\n{args.size} x {args.size}, {args.iterations} iterations, {args.threads} threads; "
        f"in memory: total {memory['total']:.2f} s, {memory['per_iteration']:.2f} s/iteration, "
        f"cpu {memory['cpu']:.2f} s"
    )
    print(
        f"{'tile':>6} {'total s':>8} {'ratio':>6} {'s/iter':>7} {'ratio':>6}"
        f" {'cpu s':>7} {'ratio':>6}  check"
    )
    ok = True
    for chunks in args.chunks:
        entry = best[chunks]
        ratio_total = entry["total"] / memory["total"]
        ratio_iter = entry["per_iteration"] / memory["per_iteration"]
        ratio_cpu = entry["cpu"] / memory["cpu"]
        check = checks[chunks]
        correct = check["support_identical"] and check["model_max_rel_diff"] < 1e-10
        ok &= correct
        results["tiled"][chunks] = {
            **entry,
            "ratio_total": ratio_total,
            "ratio_per_iteration": ratio_iter,
            "ratio_cpu": ratio_cpu,
            **check,
        }
        print(
            f"{chunks:>6} {entry['total']:>8.2f} {ratio_total:>6.2f} {entry['per_iteration']:>7.2f}"
            f" {ratio_iter:>6.2f} {entry['cpu']:>7.2f} {ratio_cpu:>6.2f}"
            f"  model rel diff {check['model_max_rel_diff']:.1e}, support "
            + ("identical" if check["support_identical"] else "DIFFERS")
        )
    best_chunks = min(args.chunks, key=lambda c: results["tiled"][c]["ratio_total"])
    best_ratio = results["tiled"][best_chunks]["ratio_total"]
    verdict = "meets" if best_ratio <= TARGET else "misses"
    print(f"best tile size {best_chunks}: ratio {best_ratio:.2f} ({verdict} target {TARGET})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
