"""Survey throughput: time per iteration of every way to run, all writing the history store.

One simulated map (``--size``, Fermi-like statistics, `loaders.simulated_sky`) is written once to
a zarr input store; every run reads it from there and writes its history to a zarr store:

- ``memory``: the in-memory engine (the input loaded into numpy first, outside the clock);
- ``bare``: the same without a store (``memory - bare`` is what writing the history costs);
- ``tiled``: tiles of ``--chunks`` on dask's threaded scheduler (``--threads`` threads);
- ``dist1`` / ``dist2``: tiles on a `LocalCluster` of 1 and 2 worker processes of
  ``--worker-threads`` threads (default 1; started before the clock);
- the same with ``--float32`` (``memory32``, ``tiled32``...) when the engine offers it.

Reported per run: the wall time of each iteration after the first (the first also writes the
inputs and iteration 0), the median over iterations, best over ``--repeats`` interleaved rounds
(every configuration meets the same machine load), and the ratios against ``memory`` of the
same round; and the mean over the iterations after the first up to the end of the run
("to the end": the in-memory engine writes an iteration while the next one computes, so its
last write ends after the last iteration's callback). Targets (issue 10): dist1 <= 1.4 x
memory, tiled <= 1.2 x memory, dist2 >= 1.8 x faster than dist1.

Run::

    python benchmarks/bench_throughput.py                       # 2048^2, 4 iterations, 3 rounds
    python benchmarks/bench_throughput.py --size 4096 --repeats 2
    python benchmarks/bench_throughput.py --modes memory tiled --json /tmp/tp.json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import xarray as xr
from distributed import Client, get_task_stream
from loaders import simulated_sky

from cwtflow import CWT, CWTKernels
from cwtflow.cluster import start_local_cluster

MODES = ("memory", "tiled", "dist1", "dist2", "bare")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="map side (pixels)")
    parser.add_argument("--chunks", type=int, default=512, help="tile side (pixels)")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the tiled run")
    parser.add_argument(
        "--worker-threads", type=int, default=1, help="threads per worker process (dist1/dist2)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES[:4]), choices=MODES)
    parser.add_argument("--float32", action="store_true", help="also run the float32 engine")
    parser.add_argument(
        "--island", type=float, default=None, help="island threshold (the labelling path)"
    )
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def make_input(size: int, chunks: int, folder: Path) -> Path:
    """The simulated map as a chunked zarr input store (tiles = zarr chunks)."""
    path = folder / "input.zarr"
    data, _ = simulated_sky((size, size), n_sources=size * size // 40_000, seed=1, binsz=0.02)
    data = data.drop_vars(["lon", "lat"], errors="ignore").chunk({"y": chunks, "x": chunks})
    data.to_zarr(path, mode="w", consolidated=False)
    return path


def estimator(args: argparse.Namespace, dtype: str | None) -> CWT:
    options: dict[str, Any] = {"max_iter": args.iterations, "tol": 0.0}
    if args.island is not None:
        options["significance_island_threshold"] = args.island
    if dtype is not None:
        options["dtype"] = dtype
    return CWT(CWTKernels(2, 3.0, 1.5), **options)


def run_once(
    args: argparse.Namespace, mode: str, source: Path, store: Path, client: Any
) -> tuple[list[float], list[float]]:
    """Seconds per iteration (all iterations, then the time from the last iteration's callback
    to the end of the run) of one run, and on a cluster the seconds of each iteration from its
    first tile task's start to its last one's end (the rest is the driver's: creating, sealing
    and opening the iteration's group)."""
    dtype = "float32" if mode.endswith("32") else None
    base = mode.removesuffix("32")
    data = xr.open_zarr(source, consolidated=False)
    if base in ("memory", "bare"):
        data = data.load()
    shutil.rmtree(store, ignore_errors=True)
    stamps = [time.perf_counter()]
    cwt = estimator(args, dtype)
    kwargs: dict[str, Any] = {
        "store": store,
        "callback": lambda _: stamps.append(time.perf_counter()),
    }
    if base == "bare":
        del kwargs["store"]
        cwt.analyze(data, **kwargs)
    elif base == "tiled":
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            cwt.analyze(data, **kwargs)
    elif base == "memory":
        cwt.analyze(data, **kwargs)
    else:
        with get_task_stream(client) as stream:
            cwt.analyze(data, client=client, **kwargs)
        return _times(stamps), task_spans(stream.data, stamps)
    return _times(stamps), []


def _times(stamps: list[float]) -> list[float]:
    """Seconds between the ``stamps``, then from the last one to now."""
    return [b - a for a, b in itertools.pairwise([*stamps, time.perf_counter()])]


def to_end(times: list[float], rest: float) -> float:
    """Mean seconds per iteration after the first, up to the end of the run."""
    return (sum(times[1:]) + rest) / max(len(times) - 1, 1)


def task_spans(tasks: list[dict[str, Any]], stamps: list[float]) -> list[float]:
    """Per iteration (between two ``stamps``, perf_counter): first task start to last end."""
    offset = time.time() - time.perf_counter()  # the task stream's clock is time.time()
    spans = []
    for start, stop in itertools.pairwise(stamps):
        inside = [
            (t["startstops"][0]["start"] - offset, t["startstops"][-1]["stop"] - offset)
            for t in tasks
        ]
        inside = [(a, b) for a, b in inside if a >= start and b <= stop]
        spans.append(max(b for _, b in inside) - min(a for a, _ in inside) if inside else 0.0)
    return spans


def main(argv: list[str]) -> int:
    args = parse(argv)
    modes = list(args.modes)
    if args.float32:
        if "dtype" not in inspect.signature(CWT).parameters:
            print("this cwtflow has no float32 engine; --float32 ignored", file=sys.stderr)
        else:
            modes += [f"{m}32" for m in args.modes]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        source = make_input(args.size, args.chunks, folder)
        clusters: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            for mode in {m.removesuffix("32") for m in modes if m.startswith("dist")}:
                n = int(mode[-1])
                cluster = stack.enter_context(
                    start_local_cluster(
                        n, threads_per_worker=args.worker_threads, memory_limit="8GiB"
                    )
                )
                clusters[mode] = stack.enter_context(Client(cluster, set_as_default=False))
            results: dict[str, list[list[float]]] = {m: [] for m in modes}
            spans: dict[str, list[list[float]]] = {m: [] for m in modes}
            ends: dict[str, list[float]] = {m: [] for m in modes}
            for round_ in range(args.repeats):
                for mode in modes:
                    client = clusters.get(mode.removesuffix("32"))
                    times, tasks = run_once(args, mode, source, folder / f"{mode}.zarr", client)
                    times, rest = times[:-1], times[-1]
                    results[mode].append(times)
                    ends[mode].append(rest)
                    spans[mode].append(tasks)
                    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
                    inside = (
                        f"; tile tasks {statistics.median(tasks[1:]):.2f} s of it"
                        if len(tasks) > 1
                        else ""
                    )
                    print(
                        f"round {round_ + 1} {mode:9s} first {times[0]:.2f} s, then "
                        f"{' '.join(f'{t:.2f}' for t in times[1:])} (median {steady:.2f} s"
                        f"{inside}; to the end {to_end(times, rest):.2f} s)",
                        flush=True,
                    )
    summary = {}
    for mode, runs in results.items():
        steady = [statistics.median(t[1:]) for t in runs if len(t) > 1]
        summary[mode] = {"best": min(steady), "median": statistics.median(steady)}
        summary[mode]["to_end_best"] = min(map(to_end, runs, ends[mode]))
        tasks = [statistics.median(t[1:]) for t in spans[mode] if len(t) > 1]
        if tasks:
            summary[mode]["tile_tasks_best"] = min(tasks)
            summary[mode]["driver_best"] = min(
                statistics.median(a - b for a, b in zip(t[1:], span[1:], strict=True))
                for t, span in zip(runs, spans[mode], strict=True)
            )
    base = summary.get("memory", {}).get("best")
    print(f"\n{args.size}^2, tiles {args.chunks}, {args.iterations} iterations, best of rounds:")
    for mode, figures in summary.items():
        ratio = f"  {figures['best'] / base:.2f} x memory" if base else ""
        print(
            f"  {mode:9s} {figures['best']:.3f} s/iteration (median {figures['median']:.3f}; "
            f"to the end {figures['to_end_best']:.3f}){ratio}"
        )
    if "dist1" in summary and "dist2" in summary:
        one, two = summary["dist1"], summary["dist2"]
        print(f"  dist1 / dist2 speed-up: {one['best'] / two['best']:.2f}")
        pairs = zip(results["dist1"], results["dist2"], strict=True)
        per_round = [statistics.median(a[1:]) / statistics.median(b[1:]) for a, b in pairs]
        print(f"  dist1 / dist2 per round: {' '.join(f'{r:.2f}' for r in per_round)}")
        if "tile_tasks_best" in one and "tile_tasks_best" in two:
            print(
                f"  tile tasks alone (first start to last end per iteration): dist1 "
                f"{one['tile_tasks_best']:.3f} s, dist2 {two['tile_tasks_best']:.3f} s, speed-up "
                f"{one['tile_tasks_best'] / two['tile_tasks_best']:.2f}; the rest of an "
                f"iteration (the driver's work) {one['driver_best']:.3f} / "
                f"{two['driver_best']:.3f} s"
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"tmp": str(args.tmp), "json": str(args.json)},
                    "runs": results,
                    "after_last_callback": ends,
                    "tile_task_spans": spans,
                    "summary": summary,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
