"""Per-iteration time of the in-memory CWT engine against a naive baseline and the FFT floor.

Run from the project root (see ``benchmarks/README.md``)::

    python benchmarks/bench_engine.py

Cases, all with the tutorial's parameters (n_scale 2, min_scale 6.0, step_scale 1.3,
significance threshold 2.0), float64, one thread:

- ``survey``: the whole Fermi survey map (101 x 2001 px) from the sample data folder (``--data``).
- ``sim``: a simulated 2048 x 2048 map (Poisson counts over a smooth background with sources),
  generated from a fixed seed (``loaders.survey_like_maps``).

Three timings per case, each the best (minimum) per-iteration time over repeats, iterations
2 .. N (iteration 1 of the engine includes its one-off set-up, which is reported apart). The
clock is the process CPU time by default (``--clock cpu``: with one thread it equals the wall
time of an idle machine, and stays meaningful on a shared, loaded one); ``--clock wall`` uses
``time.perf_counter``:

- naive: the reference behaviour written out below: one ``scipy.signal.fftconvolve`` per kernel
  and use (6 per iteration, kernel spectra recomputed each time, ``approx_bkg`` included) and
  support cleaning with one whole-image scan per connected component;
- engine: ``cwtflow.CWT.analyze`` through the public API, timed between iteration callbacks;
- FFT floor: 4 forward + 4 inverse real 2-D FFTs (``scipy.fft.rfft2``/``irfft2``, 1 worker) of
  the engine's padded grid, timed between the engine's iterations.

Targets: naive / engine >= 4 (survey) and >= 30 (sim); engine / floor <= 1.5.
"""

from __future__ import annotations

import os

# one thread for every numeric library, set before numpy is imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.fft  # noqa: E402
from loaders import add_data_argument, survey_like_maps, survey_maps  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.signal import fftconvolve  # noqa: E402

import cwtflow  # noqa: E402
from cwtflow import core  # noqa: E402

KERNELS = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}
THRESHOLD = 2.0
TARGETS = {"survey": 4.0, "sim": 30.0}
FLOOR_TARGET = 1.5
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


# --- the naive baseline ---------------------------------------------------------------------


class Naive:
    """The reference behaviour: fftconvolve per kernel and use, one image scan per component."""

    def __init__(self, counts: np.ndarray, background: np.ndarray, kernels) -> None:
        self.counts, self.background = counts, background
        self.wavelets, self.approx_kernel = kernels.wavelets, kernels.approx
        shape = counts.shape
        n = len(self.wavelets)
        self.model = np.zeros(shape)
        self.approx = np.zeros(shape)
        self.support = np.zeros((n, *shape), dtype=bool)
        self.components = 0  # connected components scanned in the last iteration

    def iterate(self) -> float:
        total = self.model + self.background + self.approx
        excess = self.counts - total
        transform = [fftconvolve(excess, k, mode="same") for k in self.wavelets]
        error = [np.sqrt(fftconvolve(total, k**2, mode="same")) for k in self.wavelets]
        self.approx = fftconvolve(
            self.counts - self.model - self.background, self.approx_kernel, "same"
        )
        self.approx_bkg = fftconvolve(self.background, self.approx_kernel, mode="same")
        self.components = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(len(self.wavelets)):
                sig = transform[i] / error[i]
                labels, n_labels = ndimage.label(sig > THRESHOLD)
                self.components += n_labels
                for label in range(1, n_labels + 1):
                    component = labels == label
                    if component.sum() == 1:  # remove isolated pixels
                        continue
                    self.support[i] |= component
        transform_2d = sum(s * t for s, t in zip(self.support, transform, strict=True))
        self.model = self.model + np.maximum(transform_2d, 0)
        return float(np.var(self.counts - (self.model + self.approx)))


def time_naive(data, n_iter: int) -> tuple[list[float], Naive]:
    kernels = cwtflow.CWTKernels(**KERNELS)
    naive = Naive(data["counts"].values, data["background"].values, kernels)
    times = []
    for _ in range(n_iter):
        start = clock()
        naive.iterate()
        times.append(clock() - start)
    return times, naive


# --- the engine -----------------------------------------------------------------------------


def floor_once(image: np.ndarray, spectrum: np.ndarray) -> float:
    """Time of 4 forward + 4 inverse real 2-D FFTs of ``image``'s grid (scipy.fft, 1 worker)."""
    start = clock()
    for _ in range(4):
        scipy.fft.rfft2(image, workers=1)
    for _ in range(4):
        scipy.fft.irfft2(spectrum, s=image.shape, workers=1)
    return clock() - start


def time_engine(data, n_iter: int, grid: tuple[int, int]) -> tuple[list[float], float, list[float]]:
    """Per-iteration times of the engine (between its public callbacks), the first iteration
    (set-up included) and FFT-floor times measured between the iterations, so that both see
    the same machine conditions."""
    cwt = cwtflow.CWT(
        cwtflow.CWTKernels(**KERNELS), significance_threshold=THRESHOLD, tol=0.0, max_iter=n_iter
    )
    image = np.random.default_rng(0).random(grid)
    spectrum = scipy.fft.rfft2(image)
    times: list[float] = []
    floors: list[float] = []
    last = [clock()]

    def callback(info) -> None:
        times.append(clock() - last[0])
        floors.append(floor_once(image, spectrum))
        last[0] = clock()

    cwt.analyze(data, callback=callback)
    return times[1:], times[0], floors


def run_case(name: str, data, args) -> dict:
    shape = (data.sizes["y"], data.sizes["x"])
    kernels = cwtflow.CWTKernels(**KERNELS)
    grid = core.fft_shape(shape, kernels.halo)
    print(f"[{name}] {shape[0]} x {shape[1]}, FFT grid {grid[0]} x {grid[1]}", file=sys.stderr)
    naive_iters = args.naive_iter
    naive_times, naive = time_naive(data, naive_iters)
    engine_samples: list[float] = []
    floor_samples: list[float] = []
    setup = np.inf
    for _ in range(args.repeat):
        times, first, floors = time_engine(data, args.engine_iter, grid)
        engine_samples += times
        floor_samples += floors
        setup = min(setup, first - min(times))
    floor = min(floor_samples)
    # the engine ran more iterations than the naive baseline: compare on the common ones
    check = cwtflow.CWT(kernels, significance_threshold=THRESHOLD, tol=0.0, max_iter=naive_iters)
    model = check.analyze(data)["model"].values
    mismatch = float(np.abs(model - naive.model).max() / max(np.abs(naive.model).max(), 1e-300))
    naive_it = min(naive_times[1:])
    engine_it = min(engine_samples)
    return {
        "case": name,
        "shape": list(shape),
        "grid": list(grid),
        "naive_s_per_iter": naive_it,
        "naive_s_per_iter_median": statistics.median(naive_times[1:]),
        "engine_s_per_iter": engine_it,
        "engine_s_per_iter_median": statistics.median(engine_samples),
        "engine_setup_s": setup,
        "fft_floor_s": floor,
        "fft_floor_s_median": statistics.median(floor_samples),
        "speedup": naive_it / engine_it,
        "speedup_target": TARGETS[name],
        "engine_over_floor": engine_it / floor,
        "floor_target": FLOOR_TARGET,
        "model_rel_diff_vs_naive": mismatch,
        "components_per_mpix": naive.components / (shape[0] * shape[1]) * 1e6,
        "mean_counts": float(data["counts"].mean()),
    }


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'case':<7} {'shape':>11} {'grid':>11} {'naive s/it':>11} {'engine s/it':>12} "
        f"{'speedup':>8} {'target':>7} {'FFT floor s':>12} {'engine/floor':>13} {'target':>7} "
        f"{'set-up s':>9} {'model diff':>10} {'comp/Mpx':>9} {'<counts>':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        grid = "x".join(map(str, r["grid"]))
        print(
            f"{r['case']:<7} {shape:>11} {grid:>11} {r['naive_s_per_iter']:>11.4f} "
            f"{r['engine_s_per_iter']:>12.4f} {r['speedup']:>7.1f}x {r['speedup_target']:>6.0f}x "
            f"{r['fft_floor_s']:>12.4f} {r['engine_over_floor']:>13.2f} "
            f"{'<=' + str(r['floor_target']):>7} {r['engine_setup_s']:>9.3f} "
            f"{r['model_rel_diff_vs_naive']:>10.1e} {r['components_per_mpix']:>9.0f} "
            f"{r['mean_counts']:>8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=["survey", "sim"], default=["survey", "sim"])
    parser.add_argument("--size", type=int, default=2048, help="side of the simulated map")
    parser.add_argument("--naive-iter", type=int, default=3, help="naive iterations (>= 2)")
    parser.add_argument("--engine-iter", type=int, default=10, help="engine iterations per run")
    parser.add_argument("--repeat", type=int, default=3, help="engine runs per case")
    add_data_argument(parser)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="timer")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.naive_iter < 2 or args.engine_iter < 2:
        parser.error("--naive-iter and --engine-iter must be at least 2")

    rows = []
    for case in args.cases:
        data = survey_maps(args.data) if case == "survey" else survey_like_maps(args.size)
        if data is None:
            print(f"[survey] skipped: no survey map in {args.data}", file=sys.stderr)
            continue
        rows.append(run_case(case, data, args))
    print(
        f"cwtflow {cwtflow.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, 1 thread, float64, "
        f"{args.clock} clock, best of the iterations timed"
    )
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
