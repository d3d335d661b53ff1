"""Cost of the store's integrity protection: a tiled run into a zarr store with CRC32C chunks,
empty chunks written and a manifest per group (as shipped) vs the same run with plain chunks
(the same compressor, no CRC32C) and a bare completion marker (the protection switched off by
patching this process).

Run from the project root::

    python benchmarks/bench_store.py --size 2048 --chunks 512 --iterations 3 --repeat 2

The map is the simulated sky of `bench_tiled.py` with the tutorial's kernels; ``tol=0`` so every
run does ``--iterations`` iterations; ``--threads`` dask threads (default 2). Runs alternate
(protected, plain, ...) and each figure is the best over ``--repeat`` rounds: the whole
``analyze`` call and the median iteration (iterations 2..N, between the public callbacks; an
iteration includes writing its group and sealing it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dask
import zarr
from loaders import simulated_sky

import cwtflow
import cwtflow.store_integrity as integrity
import cwtflow.store_writer as writer
from cwtflow.store import COMPLETE

KERNELS = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}


def plain_seal(path: Path, name: str, attrs: dict) -> None:
    group = zarr.open_group(str(path), path=name, mode="r+")
    group.attrs.update({**attrs, COMPLETE: True})


def run(data, store: Path, *, chunks: int, iterations: int, threads: int) -> dict:
    cwt = cwtflow.CWT(cwtflow.CWTKernels(**KERNELS), tol=0.0, max_iter=iterations)
    stamps: list[float] = []
    shutil.rmtree(store, ignore_errors=True)
    with dask.config.set(scheduler="threads", num_workers=threads):
        start = time.perf_counter()
        cwt.analyze(
            data, chunks=chunks, store=store, callback=lambda _: stamps.append(time.perf_counter())
        )
        total = time.perf_counter() - start
    steps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    return {"total": total, "iteration": statistics.median(steps[1:] or steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, _ = simulated_sky((args.size, args.size), seed=args.seed, binsz=0.04)
    protected = (integrity.CHUNK_CODECS, writer.seal_group, dict(writer.WRITE_OPTIONS))
    plain = (integrity.CHUNK_CODECS[:-1], plain_seal, {})
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for label, (codecs, seal, options) in (("protected", protected), ("plain", plain)):
                integrity.CHUNK_CODECS, writer.seal_group = codecs, seal
                writer.WRITE_OPTIONS = options
                got = run(
                    data,
                    Path(tmp) / f"{label}.zarr",
                    chunks=args.chunks,
                    iterations=args.iterations,
                    threads=args.threads,
                )
                old = best.setdefault(label, got)
                best[label] = {k: min(old[k], got[k]) for k in got}
    print(
        f"{args.size} x {args.size}, tiles {args.chunks}, {args.iterations} iterations, "
        f"{args.threads} threads, best of {args.repeat}"
    )
    for label, got in best.items():
        total, step = got["total"], got["iteration"]
        print(f"  {label:10s} total {total:7.2f} s   per iteration {step:6.2f} s")
    ratio = {k: best["protected"][k] / best["plain"][k] for k in ("total", "iteration")}
    total, step = ratio["total"], ratio["iteration"]
    print(f"  protected / plain: total {total:.3f}, per iteration {step:.3f}")


if __name__ == "__main__":
    main()
