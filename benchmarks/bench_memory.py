"""Peak memory of a map far larger than RAM allows per process, run tile by tile through the
zarr history store.

A simulated map (default 8192 x 16384 pixels: its float64 state is ~10.7 GB with two scales) is
generated lazily, tile by tile, from a seeded smooth background plus Gaussian sources
(``loaders.lazy_simulated_maps``); it is never materialised. The run does ``--iterations``
iterations (default 2) with ``--chunk``-pixel tiles into a store under ``--dir`` (deleted
afterwards unless ``--keep``), while a thread samples the resident set size of this process and
its children. The target is a peak RSS of at most 2 GB.

Run::

    python benchmarks/bench_memory.py --dir /work/tmp --chunk 1024

or, for the kernel's own figure, ``/usr/bin/time -v python benchmarks/bench_memory.py ...``
("Maximum resident set size").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask
import psutil
from loaders import lazy_simulated_maps

import cwtflow
from cwtflow.state import STATE_VARS, VARIABLES


class PeakRSS:
    """Samples the RSS of this process plus its children every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        proc = psutil.Process()
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def state_bytes(shape: tuple[int, int], n_scale: int) -> int:
    """Size of one float64 state (bool support) of ``shape``."""
    pixels = shape[0] * shape[1]
    total = 0
    for name in STATE_VARS:
        per = 1 if name == "support" else 8
        total += per * pixels * (n_scale if len(VARIABLES[name][0]) == 3 else 1)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(8192, 16384), metavar=("NY", "NX"))
    parser.add_argument("--chunk", type=int, default=1024, help="tile side (pixels)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--n-scale", type=int, default=2)
    parser.add_argument("--min-scale", type=float, default=2.0)
    parser.add_argument("--step-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="dask threads")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the store")
    parser.add_argument("--target-gb", type=float, default=2.0)
    args = parser.parse_args(argv)

    shape = (args.shape[0], args.shape[1])
    kernels = cwtflow.CWTKernels(args.n_scale, args.min_scale, args.step_scale)
    cwt = cwtflow.CWT(kernels, max_iter=args.iterations, tol=0.0, keep_history=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.dir)) / "run.zarr"
    data = lazy_simulated_maps(shape, args.chunk)
    free = shutil.disk_usage(args.dir).free
    print(
        f"map {shape[0]} x {shape[1]}, state {state_bytes(shape, args.n_scale) / 1e9:.2f} GB, "
        f"tiles {args.chunk}, halo {kernels.halo}, {args.threads} threads, "
        f"store {store} ({free / 1e9:.0f} GB free)",
        flush=True,
    )
    start = time.perf_counter()
    try:
        with (
            PeakRSS() as rss,
            dask.config.set(scheduler="threads", num_workers=args.threads),
        ):
            result = cwt.analyze(
                data,
                store=store,
                callback=lambda i: print(
                    f"  iteration {i.iteration}: residual variance {i.residual_variance:.6g}, "
                    f"support {i.support_size} px, {time.perf_counter() - start:.0f} s, "
                    f"peak RSS so far {rss.peak / 1e9:.2f} GB",
                    flush=True,
                ),
            )
        elapsed = time.perf_counter() - start
        on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        history = cwtflow.open_history(store)
        report = {
            "shape": list(shape),
            "chunk": args.chunk,
            "iterations": result.attrs["iterations"],
            "complete_groups": history.iterations,
            "state_gb": state_bytes(shape, args.n_scale) / 1e9,
            "peak_rss_gb": rss.peak / 1e9,
            "target_gb": args.target_gb,
            "seconds": elapsed,
            "store_gb": on_disk / 1e9,
        }
    finally:
        if not args.keep:
            shutil.rmtree(store.parent, ignore_errors=True)
    print(json.dumps(report))
    ok = report["peak_rss_gb"] <= args.target_gb
    print(
        f"peak RSS {report['peak_rss_gb']:.2f} GB for a {report['state_gb']:.1f} GB state "
        f"({'within' if ok else 'ABOVE'} the {args.target_gb:g} GB target), "
        f"{elapsed:.0f} s, store {report['store_gb']:.2f} GB"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
