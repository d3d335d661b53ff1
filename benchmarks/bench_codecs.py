"""The store's chunk compressor chosen by measurement: bytes stored and the time to write and
read back one iteration's group, for candidate codec chains on a real CWT state.

Run from the project root::

    python benchmarks/bench_codecs.py --size 2048 --chunks 512 --repeat 3

The state is the in-memory result (4 iterations, the tutorial's kernels) on the survey-like
simulated sky of `loaders.survey_like_maps`; every candidate writes the variables the store
writes per iteration (`cwtflow.store.ITERATION_VARS`) as zarr arrays of ``--chunks`` chunks,
followed by the CRC32C codec the store always adds (`cwtflow.store_integrity`). Candidates
alternate within each round; each figure is the best over ``--repeat`` rounds, per iteration
group, single thread (what one tile task does).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from loaders import survey_like_maps
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

import cwtflow
from cwtflow.store import ITERATION_VARS
from cwtflow.store_integrity import CHUNK_CODECS

CANDIDATES = {
    "none": (),
    "zstd-0": (ZstdCodec(level=0),),
    "zstd-1": (ZstdCodec(level=1),),
    "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "blosc-zstd1-shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
}


def write_group(arrays: dict[str, np.ndarray], codecs: tuple, chunks: int, where: Path) -> float:
    start = time.perf_counter()
    group = zarr.open_group(str(where), mode="w")
    for name, values in arrays.items():
        shape = values.shape
        chunk = (*shape[:-2], min(chunks, shape[-2]), min(chunks, shape[-1]))
        array = group.create_array(
            name,
            shape=shape,
            chunks=chunk,
            dtype=values.dtype,
            compressors=(*codecs, Crc32cCodec()),
            config={"write_empty_chunks": True},
        )
        array[...] = values
    return time.perf_counter() - start


def read_group(names: list[str], where: Path) -> float:
    start = time.perf_counter()
    group = zarr.open_group(str(where), mode="r")
    for name in names:
        group[name][...]
    return time.perf_counter() - start


def size_of(where: Path) -> int:
    return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    zarr.config.set({"threading.max_workers": 1})
    maps = survey_like_maps(args.size)
    state = cwtflow.CWT(cwtflow.CWTKernels(2, 6.0, 1.3), max_iter=4, tol=0.0).analyze(maps)
    arrays = {name: np.ascontiguousarray(state[name].values) for name in ITERATION_VARS}
    raw = sum(a.nbytes for a in arrays.values())
    shipped = next(name for name, c in CANDIDATES.items() if c == CHUNK_CODECS[:-1])
    best = {name: [np.inf, np.inf] for name in CANDIDATES}
    sizes = {}
    folder = Path(tempfile.mkdtemp(prefix="cwtflow-codecs-"))
    try:
        for _ in range(args.repeat):
            for name, codecs in CANDIDATES.items():
                where = folder / f"{name}.zarr"
                best[name][0] = min(best[name][0], write_group(arrays, codecs, args.chunks, where))
                best[name][1] = min(best[name][1], read_group(list(arrays), where))
                sizes[name] = size_of(where)
                shutil.rmtree(where)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"one iteration group: {args.size}^2, chunks {args.chunks}, raw {raw / 2**20:.0f} MiB")
    print(f"{'codec':22s} {'bytes/raw':>9s} {'write s':>8s} {'read s':>7s}")
    for name in CANDIDATES:
        mark = "  (shipped)" if name == shipped else ""
        write, read = best[name]
        print(f"{name:22s} {sizes[name] / raw:9.3f} {write:8.3f} {read:7.3f}{mark}")


if __name__ == "__main__":
    main()
