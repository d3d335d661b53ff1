"""One tile task of a stored iteration, timed where it runs: the driver's threads or a worker.

    python benchmarks/bench_tile_task.py              # 2048^2 map, 512^2 tiles, 12 runs each

A simulated map (`bench_throughput.make_input`) runs two iterations into a zarr history store;
then the task that computes and writes one interior tile of the last iteration
(`cwtflow.store_tiles.store_tile`: read the windows, compute, write its chunks) runs again
and again, the chunk cache cleared before each run, in

- ``threads``: dask's threaded scheduler in this process;
- ``worker``: a `LocalCluster` worker process (started by a nanny, as on any cluster);
- ``worker-nofix``: the same, with `cwtflow.allocator.heap_for_large_arrays` switched off in the
  worker: glibc's mmap threshold stays frozen at 128 KiB by the nanny's
  ``MALLOC_TRIM_THRESHOLD_`` (`cwtflow/allocator.py` explains).

The task rewrites chunks with the values they hold (the store's checksums are not updated;
the store is thrown away). Median and best seconds per task.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from bench_throughput import make_input
from distributed import Client

import cwtflow
import cwtflow.store_writer
from cwtflow.cluster import start_local_cluster


def record_last_iteration(source: Path, store: Path) -> tuple[Any, ...]:
    """Run two stored iterations; the arguments of the last `compute_tiles` call."""
    calls: list[tuple[Any, ...]] = []
    original = cwtflow.store_writer.compute_tiles

    def recording(*args: Any) -> Any:
        calls.append(args)
        return original(*args)

    cwtflow.store_writer.compute_tiles = recording
    try:
        data = xr.open_zarr(source, consolidated=False)
        cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 3.0, 1.5), max_iter=2, tol=0.0, keep_history=True)
        with dask.config.set(scheduler="threads", num_workers=1):
            cwt.analyze(data, store=store)
    finally:
        cwtflow.store_writer.compute_tiles = original
    return calls[-1]


def time_task(call: tuple[Any, ...], runs: int, fix: bool = True) -> list[float]:
    """Seconds of ``runs`` runs of one interior tile's task (in the calling process)."""
    from cwtflow import store_tiles, tiled

    if not fix:
        tiled.heap_for_large_arrays = lambda: False
    path, previous, group, work, digests = call
    edges = [np.cumsum([0, *axis]).tolist() for axis in work.chunks]
    i, j = len(work.chunks[0]) // 2, len(work.chunks[1]) // 2
    tile = (slice(edges[0][i], edges[0][i + 1]), slice(edges[1][j], edges[1][j + 1]))
    seconds = []
    for _ in range(runs):
        store_tiles.CACHE.clear()
        start = time.perf_counter()
        store_tiles.store_tile(path, previous, group, tile, (i, j), work, digests)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        source = make_input(args.size, args.chunks, folder)
        call = record_last_iteration(source, folder / "run.zarr")
        results: dict[str, list[float]] = {}
        with dask.config.set(scheduler="threads", num_workers=1):
            (results["threads"],) = dask.compute(dask.delayed(time_task)(call, args.runs))
        for mode, fix in (("worker", True), ("worker-nofix", False)):
            with (
                start_local_cluster(1, threads_per_worker=1, dashboard=False) as cluster,
                Client(cluster) as client,
            ):
                results[mode] = client.submit(time_task, call, args.runs, fix, pure=False).result()
    print(f"{args.size}^2 map, {args.chunks}^2 tiles: seconds per tile task ({args.runs} runs)")
    for mode, seconds in results.items():
        print(f"  {mode:13s} median {statistics.median(seconds):.3f}  best {min(seconds):.3f}")


if __name__ == "__main__":
    main()
