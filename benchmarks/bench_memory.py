"""Peak memory of a map far larger than RAM allows per process, run tile by tile through the
zarr history store.

A simulated map (default 8192 x 16384 pixels: its float64 state is ~10.7 GB with two scales) is
generated lazily, tile by tile, from a seeded smooth background plus Gaussian sources; it is
never materialised. The run does ``--iterations`` iterations (default 2) with ``--chunk``-pixel
tiles into a store under ``--dir`` (deleted afterwards unless ``--keep``), while a thread samples
the resident set size of this process and its children. The target is a peak RSS of at most
2 GB.

Run::

    python benchmarks/bench_memory.py --dir /work/tmp --chunk 1024

or, for the kernel's own figure, ``/usr/bin/time -v python benchmarks/bench_memory.py ...``
("Maximum resident set size").
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import psutil
import xarray as xr

import cwtflow
from cwtflow.maps import default_wcs, wcs_to_attrs
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


def _sources(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """(n, 4) array of source (y, x, flux in counts, sigma in pixels)."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [
            rng.uniform(0, shape[0], n),
            rng.uniform(0, shape[1], n),
            rng.uniform(30.0, 300.0, n),
            rng.uniform(1.0, 3.0, n),
        ]
    )


def _background_block(y0: int, y1: int, x0: int, x1: int, level: float) -> np.ndarray:
    y = np.arange(y0, y1, dtype=np.float64)[:, None]
    x = np.arange(x0, x1, dtype=np.float64)[None, :]
    return level * (1.0 + 0.5 * np.sin(x / 400.0) * np.cos(y / 300.0) + 0.3 * np.exp(-y / 5000.0))


def _rate_block(y0, y1, x0, x1, level, sources) -> np.ndarray:
    """Background plus every source, each evaluated within 5 sigma of its centre only."""
    rate = _background_block(y0, y1, x0, x1, level)
    for sy, sx, flux, sigma in sources:
        reach = 5 * sigma
        ya, yb = max(y0, int(sy - reach)), min(y1, int(sy + reach) + 1)
        xa, xb = max(x0, int(sx - reach)), min(x1, int(sx + reach) + 1)
        if ya >= yb or xa >= xb:
            continue
        y = np.arange(ya, yb, dtype=np.float64)[:, None]
        x = np.arange(xa, xb, dtype=np.float64)[None, :]
        r2 = (y - sy) ** 2 + (x - sx) ** 2
        patch = flux * np.exp(-r2 / (2 * sigma**2)) / (2 * math.pi * sigma**2)
        rate[ya - y0 : yb - y0, xa - x0 : xb - x0] += patch
    return rate


def simulated_maps(
    shape: tuple[int, int], chunk: int, *, seed: int = 1, level: float = 0.5, n_sources: int = 2000
) -> xr.Dataset:
    """Lazy input Dataset: every tile of counts/background/lon/lat is generated on demand."""
    sources = _sources(shape, n_sources, seed)
    wcs = default_wcs(shape, binsz=0.02)
    template = da.zeros(shape, chunks=chunk, dtype=np.float64)

    def background(block, block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return _background_block(y0, y1, x0, x1, level)

    def counts(block, block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        iy, ix = block_info[None]["chunk-location"]
        rng = np.random.default_rng([seed, iy, ix])
        return rng.poisson(_rate_block(y0, y1, x0, x1, level, sources)).astype(np.float64)

    def sky(block, axis, block_info=None):
        # CAR with CRVAL2 = 0 and no rotation: lon depends on x only, lat on y only.
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        if axis == 0:
            x = np.arange(x0, x1, dtype=np.float64)
            line = wcs.wcs_pix2world(x, np.zeros_like(x), 0)[0]
            return np.broadcast_to(line[None, :], (y1 - y0, x1 - x0)).copy()
        y = np.arange(y0, y1, dtype=np.float64)
        line = wcs.wcs_pix2world(np.zeros_like(y), y, 0)[1]
        return np.broadcast_to(line[:, None], (y1 - y0, x1 - x0)).copy()

    lon = da.map_blocks(sky, template, 0, dtype=np.float64)
    lat = da.map_blocks(sky, template, 1, dtype=np.float64)
    return xr.Dataset(
        {
            "counts": (("y", "x"), da.map_blocks(counts, template, dtype=np.float64)),
            "background": (("y", "x"), da.map_blocks(background, template, dtype=np.float64)),
        },
        coords={
            "lon": (("y", "x"), lon, {"units": "deg"}),
            "lat": (("y", "x"), lat, {"units": "deg"}),
        },
        attrs={"wcs": wcs_to_attrs(wcs)},
    )


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
    data = simulated_maps(shape, args.chunk)
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
