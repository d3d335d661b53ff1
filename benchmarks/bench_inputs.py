"""Inputs: start-up time of the command line, reading a large FITS file, and the memory of
converting a gzip FITS file to zarr.

Three parts, each a subprocess or a timing in this process, interleaved rounds, best of each:

1. ``cwtflow --help``: wall time of ``python -c "from cwtflow.cli import main; main(['--help'])"``
   (the console script's work); target < 0.5 s. Also the time of ``python -c pass`` (the
   interpreter's own start) for reference.
2. Reading a ``--size`` x ``--size`` FITS file (int32 counts, float32 background): astropy's
   own read of the two images into float64 arrays (the baseline), `cwtflow.read_maps` in
   memory (``chunks=None``), and `read_maps` lazily (``chunks=1024``) then computed; target
   read_maps / astropy <= 1.5.
3. Peak RSS of `cwtflow.convert.convert_maps` on the same maps gzip-compressed, at
   ``--convert-size`` (default 8192), in a subprocess (psutil RSS after imports, the kernel's
   ``VmHWM`` of that process at the end: ``ru_maxrss`` would include the parent's RSS at
   fork), against astropy reading the gzip file (the whole HDUs).

Run::

    python benchmarks/bench_inputs.py --dir /work/tmp

The script exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from cwtflow.io import read_maps
from cwtflow.maps import default_wcs

HELP = "from cwtflow.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
CONVERT = """
import sys, psutil
def _peak_mib():
    with open('/proc/self/status') as f:  # VmHWM: this process's own peak (not inherited)
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) // 1024
from cwtflow.convert import convert_maps
base = psutil.Process().memory_info().rss
convert_maps(sys.argv[1], sys.argv[2], chunk=int(sys.argv[3]))
print(base // 2**20, _peak_mib())
"""
ASTROPY = """
import sys, psutil
def _peak_mib():
    with open('/proc/self/status') as f:  # VmHWM: this process's own peak (not inherited)
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) // 1024
import numpy as np
from astropy.io import fits
base = psutil.Process().memory_info().rss
with fits.open(sys.argv[1]) as hdul:
    total = sum(float(np.asarray(h.data, dtype=np.float64).sum()) for h in hdul)
print(base // 2**20, _peak_mib())
"""


def write_maps_file(path: Path, size: int) -> Path:
    shape = (size, size)
    rng = np.random.default_rng(0)
    y = np.linspace(-1, 1, size)[:, None]
    background = (0.5 + np.exp(-(y**2) / 0.1) * np.ones(size)).astype(np.float32)
    counts = rng.poisson(background).astype(np.int32)
    header = default_wcs(shape, binsz=0.02).to_header()
    primary = fits.PrimaryHDU(counts, header=header)
    primary.header["EXTNAME"] = "COUNTS"
    hdus = fits.HDUList([primary, fits.ImageHDU(background, header=header, name="BACKGROUND")])
    hdus.writeto(path, overwrite=True)
    return path


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def best(func, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return min(times)


def astropy_read(path: Path) -> None:
    with fits.open(path, memmap=False) as hdul:
        for name in ("COUNTS", "BACKGROUND"):
            np.asarray(hdul[name].data, dtype=np.float64)


def peak(script: str, *args: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], check=True, capture_output=True, text=True
    )
    base, top = (int(v) for v in out.stdout.split())
    return base, top


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder.")
    parser.add_argument("--size", type=int, default=4096, help="Side of the read benchmark.")
    parser.add_argument("--convert-size", type=int, default=8192, help="Side of the gzip map.")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-inputs-"))
    results: dict[str, float | int] = {}
    ok = True
    try:
        # 1. start-up
        helps = [wall([sys.executable, "-c", HELP]) for _ in range(args.rounds)]
        results["help_s"] = min(helps)
        results["python_start_s"] = min(
            wall([sys.executable, "-c", "pass"]) for _ in range(args.rounds)
        )
        ok &= results["help_s"] < 0.5
        # 2. read a large FITS file
        path = write_maps_file(scratch / "maps.fits", args.size)
        timings: dict[str, list[float]] = {"astropy": [], "eager": [], "lazy": [], "open": []}
        read_maps(path, chunks=1024).compute()  # warm-up: first use imports dask's machinery
        astropy_read(path)
        for _ in range(args.rounds):  # interleaved rounds
            timings["astropy"].append(best(lambda: astropy_read(path), 1))
            timings["eager"].append(best(lambda: read_maps(path, chunks=None), 1))
            timings["open"].append(best(lambda: read_maps(path, chunks=1024), 1))
            timings["lazy"].append(best(lambda: read_maps(path, chunks=1024).compute(), 1))
        for key, values in timings.items():
            results[f"read_{key}_s"] = min(values)
        results["eager_over_astropy"] = results["read_eager_s"] / results["read_astropy_s"]
        results["lazy_over_astropy"] = results["read_lazy_s"] / results["read_astropy_s"]
        ok &= results["eager_over_astropy"] <= 1.5
        # 3. convert a gzip file: peak RSS
        gz = scratch / "big.fits.gz"
        big = write_maps_file(scratch / "big.fits", args.convert_size)
        with open(big, "rb") as src, __import__("gzip").open(gz, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 2**24)
        big.unlink()
        for chunk in (512, 1024):
            base, top = peak(CONVERT, str(gz), str(scratch / f"big-{chunk}.zarr"), str(chunk))
            results[f"convert_chunk{chunk}_base_mib"] = base
            results[f"convert_chunk{chunk}_peak_mib"] = top
            shutil.rmtree(scratch / f"big-{chunk}.zarr")
        base, top = peak(ASTROPY, str(gz))
        results["astropy_gz_base_mib"], results["astropy_gz_peak_mib"] = base, top
        results["float64_map_mib"] = args.convert_size**2 * 8 // 2**20
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
