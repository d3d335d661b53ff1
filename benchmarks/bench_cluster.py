"""Distributed scaling: the same tiled run through a zarr store on 1 and on 2 worker processes.

Both runs use the same simulated map, tiles, kernels and store settings, on a `LocalCluster` of
single-threaded worker processes bound to 127.0.0.1, started before the clock runs. The input
maps are first written to a zarr store and opened lazily, as a survey run would (workers read
their tiles; nothing big travels through the scheduler). Reported:

- wall time of ``CWT.analyze`` (inputs and iteration 0 written, then ``--iterations``
  iterations) and of each iteration, best of ``--repeats`` (1- and 2-worker runs interleaved,
  so that both meet the same machine load); the speed-up 1 -> 2 workers (target >= 1.7 on a
  2-core machine);
- per-tile cost from the scheduler's task stream: worker seconds per tile per iteration (all
  tasks of the iteration, labelling and store writes included, divided by the tiles), and the
  tile-function seconds alone;
- bytes per tile: state in memory, state stored per iteration (compressed, on disk), and the
  peak resident memory of a worker process (sampled every 10 ms in each worker).

Run::

    python benchmarks/bench_cluster.py                      # 4096 x 4096, tiles 1024, 3 its
    python benchmarks/bench_cluster.py --size 2048 --chunks 512 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from distributed import Client, get_task_stream
from loaders import simulated_sky

from cwtflow import CWT, CWTKernels
from cwtflow.cluster import TaskProgress, start_local_cluster
from cwtflow.state import STATE_VARS


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="map side (pixels)")
    parser.add_argument("--chunks", type=int, default=1024, help="tile side (pixels)")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count (best)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-scale", type=int, default=2)
    parser.add_argument("--min-scale", type=float, default=6.0)
    parser.add_argument("--step-scale", type=float, default=1.3)
    parser.add_argument(
        "--island-threshold",
        type=float,
        default=None,
        help="significance_island_threshold (turns on the global labelling step)",
    )
    parser.add_argument("--memory-limit", default="8GiB", help="per worker process")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def make_inputs(args: argparse.Namespace, folder: Path) -> Path:
    """Simulate the map once and store it as zarr (tiles = zarr chunks)."""
    path = folder / "inputs.zarr"
    data, _ = simulated_sky(
        (args.size, args.size), n_sources=args.size * args.size // 40_000, seed=1, binsz=0.02
    )
    data = data.drop_vars(["lon", "lat"]).chunk({"y": args.chunks, "x": args.chunks})
    data.to_zarr(path, mode="w", consolidated=False)
    return path


def open_inputs(path: Path, chunks: int) -> xr.Dataset:
    return xr.open_zarr(path, chunks={"y": chunks, "x": chunks}, consolidated=False)


def _start_rss_sampler(dask_worker: Any) -> None:
    """In a worker: sample its resident memory every 10 ms, keep the maximum.

    (``ru_maxrss`` would not do: Linux carries it over from the parent process across
    fork/exec, so a worker spawned by a big driver starts with the driver's peak.)
    """
    import threading

    import psutil

    process = psutil.Process()
    dask_worker.cwtflow_bench_peak = process.memory_info().rss
    dask_worker.cwtflow_bench_stop = threading.Event()

    def sample() -> None:
        while not dask_worker.cwtflow_bench_stop.wait(0.01):
            rss = process.memory_info().rss
            dask_worker.cwtflow_bench_peak = max(dask_worker.cwtflow_bench_peak, rss)

    threading.Thread(target=sample, daemon=True).start()


def _stop_rss_sampler(dask_worker: Any) -> int:
    dask_worker.cwtflow_bench_stop.set()
    return int(dask_worker.cwtflow_bench_peak)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_once(args: argparse.Namespace, client: Client, inputs: Path, store: Path) -> dict[str, Any]:
    kernels = CWTKernels(args.n_scale, args.min_scale, args.step_scale)
    cwt = CWT(
        kernels,
        max_iter=args.iterations,
        tol=0.0,
        significance_island_threshold=args.island_threshold,
    )
    data = open_inputs(inputs, args.chunks)
    marks: list[float] = []
    tasks: list[int] = []
    shutil.rmtree(store, ignore_errors=True)
    client.run(_start_rss_sampler)
    with get_task_stream(client) as stream, TaskProgress(client, disable=True) as bar:

        def callback(info: object) -> None:
            marks.append(time.perf_counter())
            tasks.append(bar.poll()[1])

        start = time.perf_counter()
        cwt.analyze(data, store=store, client=client, callback=callback)
        total = time.perf_counter() - start
    worker_peak = max(client.run(_stop_rss_sampler).values())
    # per-iteration task seconds: tasks that started within each iteration's window
    bounds = [start, *marks]
    offset = time.time() - time.perf_counter()  # perf_counter -> epoch seconds
    windows = [(a + offset, b + offset) for a, b in itertools.pairwise(bounds)]
    busy: list[float] = [0.0] * len(windows)
    by_prefix: dict[str, float] = defaultdict(float)
    for task in stream.data:
        for ss in task["startstops"]:
            if ss["action"] != "compute":
                continue
            seconds = ss["stop"] - ss["start"]
            for i, (a, b) in enumerate(windows):
                if a <= ss["start"] < b:
                    busy[i] += seconds
                    prefix = task["key"][0] if isinstance(task["key"], tuple) else task["key"]
                    by_prefix[str(prefix).rsplit("-", 1)[0]] += seconds
    iteration_times = [b - a for a, b in windows]
    return {
        "total_s": total,
        "iteration_s": iteration_times,
        "tasks_per_iteration": [b - a for a, b in itertools.pairwise([0, *tasks])],
        "task_s_per_iteration": busy,
        "task_s_by_prefix": dict(sorted(by_prefix.items(), key=lambda kv: -kv[1])[:8]),
        # the tile function: the graph path's `tile_iteration`, or the store's tile task
        # (`cwtflow.store_tiles`: reads, computes and writes the tile)
        "tile_function_s": sum(
            v for k, v in by_prefix.items() if k.startswith(("tile_iteration", "store-tile"))
        ),
        "global_join_s": sum(v for k, v in by_prefix.items() if "_join" in k),
        "store_bytes": _dir_bytes(store),
        "worker_peak_rss": worker_peak,
    }


def _noop(x: int) -> int:
    return x


def scheduler_throughput(client: Client, n: int = 4000) -> float:
    """Tasks per second the cluster gets through when tasks do nothing (scheduling overhead)."""
    client.gather(client.map(_noop, range(200), pure=False))  # warm up
    start = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return n / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    args = parse(argv)
    tiles = math.ceil(args.size / args.chunks) ** 2
    kernels = CWTKernels(args.n_scale, args.min_scale, args.step_scale)
    folder = Path(tempfile.mkdtemp(prefix="cwtflow-bench-cluster-", dir=args.tmp))
    print(
        f"map {args.size} x {args.size}, tiles {args.chunks} ({tiles} tiles), halo "
        f"{kernels.halo}, {args.iterations} iterations; cpus {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.1f}; scratch {folder}",
        flush=True,
    )
    try:
        inputs = make_inputs(args, folder)
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.workers}
        for repeat in range(args.repeats):  # interleaved, so that both see the same machine
            for n in args.workers:
                with (
                    start_local_cluster(
                        n, threads_per_worker=1, memory_limit=args.memory_limit, dashboard=False
                    ) as cluster,
                    Client(cluster, set_as_default=False) as client,
                ):
                    run = run_once(args, client, inputs, folder / f"run-{n}.zarr")
                    run["noop_tasks_per_s"] = scheduler_throughput(client)
                    run["load_after"] = os.getloadavg()[0]
                runs[n].append(run)
                print(
                    f"[{repeat + 1}/{args.repeats}] {n} worker(s): total {run['total_s']:.2f} s; "
                    f"iterations {', '.join(f'{t:.2f}' for t in run['iteration_s'])} s (the "
                    f"first includes writing the inputs and iteration 0); tasks per iteration "
                    f"{run['tasks_per_iteration']}; worker peak RSS "
                    f"{run['worker_peak_rss'] / 2**20:.0f} MiB; no-op tasks "
                    f"{run['noop_tasks_per_s']:.0f}/s; load {run['load_after']:.1f}",
                    flush=True,
                )
        results = {n: min(r, key=lambda run: run["total_s"]) for n, r in runs.items()}
        base = results[min(results)]
        tile_px = args.chunks * args.chunks
        n_2d = sum(1 for v in STATE_VARS if v not in ("transform_3d", "error", "support"))
        state_bytes = tile_px * (8 * n_2d + kernels.n_scale * (8 + 8 + 1))
        steady = slice(1, None) if args.iterations > 1 else slice(None)
        iteration_task_s = float(np.median(base["task_s_per_iteration"][steady]))
        tasks_per_tile = float(np.median(base["tasks_per_iteration"][steady])) / tiles
        summary = {
            "size": args.size,
            "chunks": args.chunks,
            "tiles": tiles,
            "halo": kernels.halo,
            "iterations": args.iterations,
            "kernels": kernels.to_dict(),
            "results": results,
            "per_tile": {
                "worker_s_per_tile_iteration": iteration_task_s / tiles,
                "tasks_per_tile_iteration": tasks_per_tile,
                "state_bytes_in_memory": state_bytes,
                "stored_bytes_per_iteration": base["store_bytes"]
                / tiles
                / (args.iterations + 1 + 1),  # iterations, iteration 0 and the inputs
                "worker_peak_rss": base["worker_peak_rss"],
            },
        }
        if len(results) > 1:
            lo, hi = min(results), max(results)
            speedup = results[lo]["total_s"] / results[hi]["total_s"]
            it_speedup = sum(results[lo]["iteration_s"][steady]) / sum(
                results[hi]["iteration_s"][steady]
            )
            summary["speedup"] = speedup
            summary["iteration_speedup"] = it_speedup
            verdict = "meets" if speedup >= 1.7 else "misses"
            print(
                f"speed-up {lo} -> {hi} workers: {speedup:.2f}x whole run, "
                f"{it_speedup:.2f}x iterations after the first ({verdict} the 1.7x target)"
            )
        per = summary["per_tile"]
        mib = 2**20
        print(
            f"per tile ({args.chunks}^2 px, 1 worker): "
            f"{per['worker_s_per_tile_iteration']:.3f} worker-s and "
            f"{per['tasks_per_tile_iteration']:.0f} tasks per iteration; state "
            f"{per['state_bytes_in_memory'] / mib:.0f} MiB in memory, "
            f"{per['stored_bytes_per_iteration'] / mib:.1f} MiB stored per iteration; "
            f"worker peak RSS {per['worker_peak_rss'] / mib:.0f} MiB"
        )
        print("busiest task kinds (1 worker, s):", base["task_s_by_prefix"])
        print(
            f"tile function {base['tile_function_s'] / tiles / args.iterations:.3f} s per tile "
            f"per iteration; global labelling join {base['global_join_s']:.3f} s in all"
        )
        if args.json is not None:
            args.json.write_text(json.dumps(summary, indent=2, default=float))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
