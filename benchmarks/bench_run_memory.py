"""Peak memory of ``cwtflow run`` on a survey-sized input with local workers: the driver and
each worker process apart, and whether dask warned about a large graph.

Writes a simulated 16384 x 8192 map (`loaders.lazy_simulated_maps`, generated tile by tile)
once as an uncompressed FITS file (float32 COUNTS and BACKGROUND, streamed one band of rows at
a time) and converts it with ``cwtflow convert`` into a zarr input; then runs, for each input::

    cwtflow run INPUT --chunks 1024 --workers 2 --out run.zarr --max-iter 2 --tol 0

as a subprocess, sampling every 0.1 s the resident set size of the command (the driver) and
of each of its descendant processes (the local cluster's nannies and workers). Targets: the
driver <= 1 GB, each worker <= 2 GB, no "large graph" warning in the output.

Run from the project root::

    python benchmarks/bench_run_memory.py --dir /work/tmp
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from astropy.io import fits
from loaders import lazy_simulated_maps

from cwtflow.io import wcs_header


def write_fits(path: Path, shape: tuple[int, int], chunk: int) -> None:
    """COUNTS and BACKGROUND as float32 image extensions, written band by band."""
    data = lazy_simulated_maps(shape, chunk)
    fits.PrimaryHDU().writeto(str(path))
    for name, hdu in (("counts", "COUNTS"), ("background", "BACKGROUND")):
        header = wcs_header(data.attrs)
        header.insert(0, ("XTENSION", "IMAGE"))
        header.insert(1, ("BITPIX", -32))
        header.insert(2, ("NAXIS", 2))
        header.insert(3, ("NAXIS1", shape[1]))
        header.insert(4, ("NAXIS2", shape[0]))
        header.insert(5, ("PCOUNT", 0))
        header.insert(6, ("GCOUNT", 1))
        header["EXTNAME"] = hdu
        stream = fits.StreamingHDU(str(path), header)
        for y in range(0, shape[0], chunk):
            band = data[name][y : y + chunk].values.astype(">f4")
            stream.write(band)
        stream.close()


class ProcessPeaks:
    """Peak RSS of a process and of each of its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in processes:
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline()[1:4])
                except psutil.Error:
                    continue
                old = self.peaks.get(proc.pid, (name, 0))
                self.peaks[proc.pid] = (old[0] or name, max(old[1], rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(command: list[str]) -> tuple[float, int, list[tuple[str, int]], str]:
    """Wall time, driver peak, descendants' peaks (largest first) and output of ``command``."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = ProcessPeaks(proc.pid)
    output, _ = proc.communicate()
    peaks.stop()
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{output}")
    driver = peaks.peaks.pop(proc.pid, ("", 0))[1]
    others = sorted(peaks.peaks.values(), key=lambda item: -item[1])
    return elapsed, driver, others, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(8192, 16384), metavar=("NY", "NX"))
    parser.add_argument("--chunks", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    shape = (args.shape[0], args.shape[1])
    folder = Path(tempfile.mkdtemp(prefix="bench_run_memory_", dir=args.dir))
    cwtflow = [shutil.which("cwtflow") or "cwtflow"]
    try:
        fits_file, zarr_input = folder / "maps.fits", folder / "maps.zarr"
        start = time.perf_counter()
        write_fits(fits_file, shape, args.chunks)
        print(f"wrote {fits_file} ({shape[0]} x {shape[1]}) in {time.perf_counter() - start:.0f} s")
        seconds, driver, _, _ = run([*cwtflow, "convert", str(fits_file), str(zarr_input)])
        print(f"cwtflow convert: {seconds:.0f} s, peak RSS {driver / 2**20:.0f} MiB")
        for source in (zarr_input, fits_file):
            out = folder / "run.zarr"
            command = [*cwtflow, "run", str(source), "--out", str(out), "--chunks"]
            command += [str(args.chunks), str(args.chunks), "--workers", str(args.workers)]
            command += ["--max-iter", str(args.iterations), "--tol", "0"]
            seconds, driver, others, output = run(command)
            shutil.rmtree(out)
            warned = "large graph" in output.lower()
            workers = [rss for name, rss in others if "spawn_main" in name]
            print(f"\ncwtflow run {source.name}: {seconds:.0f} s, {args.iterations} iterations")
            print(f"  driver peak RSS {driver / 2**30:.2f} GiB (target 1 GB)")
            peaks = ", ".join(f"{w / 2**30:.2f} GiB" for w in workers)
            print(f"  worker processes peak RSS: {peaks} (target 2 GB each)")
            for name, rss in others:
                print(f"    {rss / 2**20:7.0f} MiB  {name}")
            print(f"  'large graph' warning: {'YES' if warned else 'no'}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
