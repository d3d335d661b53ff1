"""Input maps from files: lazy FITS reads chunk by chunk, zarr inputs, separate files, one-bin
energy cubes, gzip conversion, and pixel checks fused with the first read."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from cwtflow import CWT, CWTKernels, InputError, StoreError
from cwtflow.convert import convert_maps
from cwtflow.inputs import FitsSection, parse_source
from cwtflow.io import read_maps
from cwtflow.maps import default_wcs, wcs_to_attrs

SHAPE = (50, 70)
CHUNKS = (16, 32)


def _arrays(shape=SHAPE, seed=1):
    rng = np.random.default_rng(seed)
    background = rng.uniform(0.5, 2.0, shape)
    return rng.poisson(background).astype(np.int32), background, np.full(shape, 3e10, np.float32)


def write_fits(path: Path, shape=SHAPE, *, cube: int | None = None, exposure=True, seed=1):
    """COUNTS (int32 primary), BACKGROUND (float64), EXPOSURE (float32) on a Galactic CAR
    grid centred on l = 0; ``cube``: a third (energy) axis of that length on every image."""
    counts, background, expo = _arrays(shape, seed)
    header = default_wcs(shape).to_header()
    if cube is not None:
        header["CTYPE3"], header["CRPIX3"], header["CRVAL3"], header["CDELT3"] = (
            "ENERGY",
            1.0,
            1e5,
            1e5,
        )
        header["CUNIT3"] = "MeV"
        counts, background, expo = (np.stack([a] * cube) for a in (counts, background, expo))
    hdus = [fits.PrimaryHDU(counts, header=header)]
    hdus[0].header["EXTNAME"] = "COUNTS"
    hdus.append(fits.ImageHDU(background, header=header, name="BACKGROUND"))
    if exposure:
        hdus.append(fits.ImageHDU(expo, header=header, name="EXPOSURE"))
    fits.HDUList(hdus).writeto(path)
    return path


@pytest.fixture
def fits_file(tmp_path) -> Path:
    return write_fits(tmp_path / "maps.fits")


# --------------------------------------------------------------------------------------------
# Lazy FITS


def test_lazy_read_equals_eager_read_and_reads_chunk_by_chunk(fits_file, monkeypatch):
    eager = read_maps(fits_file, chunks=None)
    assert isinstance(eager["counts"].data, np.ndarray)
    reads: list[tuple[int, ...]] = []
    original = FitsSection.__getitem__

    def counting(self, key):
        out = original(self, key)
        reads.append(out.shape)
        return out

    def untouchable(self):
        raise AssertionError("astropy read a whole image")

    monkeypatch.setattr(FitsSection, "__getitem__", counting)
    monkeypatch.setattr(fits.ImageHDU, "data", property(untouchable))
    monkeypatch.setattr(fits.PrimaryHDU, "data", property(untouchable))
    lazy = read_maps(fits_file, chunks=CHUNKS)
    assert reads == []  # nothing read on opening
    for name in ("counts", "background", "exposure"):
        assert lazy[name].chunks == ((16, 16, 16, 2), (32, 32, 6))
    xr.testing.assert_identical(lazy.compute(), eager)
    assert reads and max(np.prod(r) for r in reads) <= np.prod(CHUNKS)
    # the graph holds the reader (path and offsets), no pixels: it pickles small
    import pickle

    assert len(pickle.dumps(dict(lazy["counts"].data.dask))) < 20_000


def test_auto_chunks_follow_the_size_rule(fits_file, monkeypatch):
    assert read_maps(fits_file)["counts"].chunks is None  # small: in memory
    monkeypatch.setattr("cwtflow.inputs.IN_MEMORY_BYTES", 1000)
    big = read_maps(fits_file)
    assert big["counts"].chunks is not None  # over the limit: lazy


def test_reader_applies_bscale_bzero_blank(tmp_path):
    values = np.arange(12, dtype=np.int16).reshape(3, 4)
    hdu = fits.PrimaryHDU(values, header=default_wcs((3, 4)).to_header())
    hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.5, 10.0, 5
    hdu.header["EXTNAME"] = "COUNTS"
    fits.HDUList([hdu, fits.ImageHDU(np.ones((3, 4)), name="BACKGROUND")]).writeto(
        tmp_path / "s.fits", output_verify="silentfix"
    )
    with fits.open(tmp_path / "s.fits", memmap=False) as hdul:
        offset = hdul.fileinfo(0)["datLoc"]
    section = FitsSection(tmp_path / "s.fits", offset, (3, 4), ">i2", bscale=0.5, bzero=10, blank=5)
    expected = values * 0.5 + 10.0
    expected[values == 5] = np.nan
    np.testing.assert_array_equal(section[:, :], expected)
    np.testing.assert_array_equal(section[1:3, 2:], expected[1:3, 2:])


def test_lazy_input_checks_add_no_pass_over_the_file(tmp_path, monkeypatch):
    """analyze computes the pixel checks of a lazy input with its first read of the maps."""
    path = write_fits(tmp_path / "maps.fits", (40, 48))
    reads: dict[tuple, int] = {}
    original = FitsSection.__getitem__

    def counting(self, key):
        reads[(self.offset, str(key))] = reads.get((self.offset, str(key)), 0) + 1
        return original(self, key)

    monkeypatch.setattr(FitsSection, "__getitem__", counting)
    data = read_maps(path, chunks=(20, 24))
    kernels = CWTKernels(1, 1.5, 1.4)
    CWT(kernels, max_iter=1).analyze(data)  # no store: with the persist of the initial state
    assert len(reads) == 3 * 4 and set(reads.values()) == {1}
    counts = {}
    for label, checks in (("with", None), ("without", {})):
        if checks is not None:
            monkeypatch.setattr("cwtflow.engine.pixel_checks", lambda data, checks=checks: checks)
        reads.clear()
        CWT(kernels, max_iter=1).analyze(data, store=tmp_path / f"{label}.zarr")
        counts[label] = dict(reads)
    # with a store: the checks ride on the input write (which, with its checksums, reads
    # every chunk the same number of times with or without them)
    assert counts["with"] == counts["without"]
    lazy = cwtflow_open(tmp_path / "with.zarr")
    expected = CWT(kernels, max_iter=1).analyze(read_maps(path, chunks=None))
    np.testing.assert_allclose(lazy["model"].values, expected["model"].values, atol=1e-12)


def cwtflow_open(path: Path) -> xr.Dataset:
    from cwtflow.history import open_history

    return open_history(path).final


@pytest.mark.parametrize("store", [False, True])
def test_bad_pixels_of_a_lazy_input_are_refused_by_analyze(tmp_path, store):
    counts, background, _ = _arrays((30, 40))
    background[7, 9] = -1.0
    header = default_wcs((30, 40)).to_header()
    hdus = [fits.PrimaryHDU(counts, header=header), fits.ImageHDU(background, name="BACKGROUND")]
    hdus[0].header["EXTNAME"] = "COUNTS"
    hdus[1].header.update(header)
    fits.HDUList(hdus).writeto(tmp_path / "bad.fits")
    data = read_maps(tmp_path / "bad.fits", chunks=16)  # structure checked, pixels not yet
    with pytest.raises(InputError, match="background contains negative pixels"):
        read_maps(tmp_path / "bad.fits", chunks=16, check_values=True)
    target = tmp_path / "run.zarr" if store else None
    with pytest.raises(InputError, match=r"background contains negative pixels \(1 negative"):
        CWT(CWTKernels(1, 1.5, 1.4), max_iter=1).analyze(data, store=target)
    assert not (tmp_path / "run.zarr").exists()  # no store left behind


# --------------------------------------------------------------------------------------------
# Separate files, energy cubes, gzip


def test_background_and_exposure_from_other_files(tmp_path, fits_file):
    _, background, expo = _arrays()
    header = default_wcs(SHAPE).to_header()
    fits.PrimaryHDU(background, header=header).writeto(tmp_path / "bkg.fits")
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(expo * 2, header=header, name="EXPMAP")]
    ).writeto(tmp_path / "exp.fits")
    reference = read_maps(fits_file)
    for chunks in (None, 16):
        data = read_maps(
            fits_file,
            background=tmp_path / "bkg.fits",  # its only image
            exposure=(tmp_path / "exp.fits", "EXPMAP"),
            chunks=chunks,
        ).compute()
        np.testing.assert_array_equal(data["background"].values, reference["background"].values)
        np.testing.assert_array_equal(data["exposure"].values, 2 * reference["exposure"].values)
    same = read_maps(fits_file, exposure=f"{tmp_path / 'exp.fits'}[EXPMAP]")
    np.testing.assert_array_equal(same["exposure"].values, 2 * reference["exposure"].values)
    assert parse_source("a/b.fits[1]") == (Path("a/b.fits"), 1)
    assert parse_source("b.fits") == (Path("b.fits"), None)
    fits.PrimaryHDU(background[:, :-1], header=header).writeto(tmp_path / "small.fits")
    with pytest.raises(InputError, match="shapes differ"):
        read_maps(fits_file, background=tmp_path / "small.fits")
    two = fits.HDUList([fits.PrimaryHDU(background, header=header), fits.ImageHDU(background)])
    two.writeto(tmp_path / "two.fits")
    with pytest.raises(InputError, match="not exactly one image"):
        read_maps(fits_file, background=tmp_path / "two.fits")


@pytest.mark.parametrize("chunks", [None, 16])
def test_one_bin_energy_cube_is_squeezed(tmp_path, chunks):
    flat = read_maps(write_fits(tmp_path / "flat.fits"), chunks=None)
    cube = read_maps(write_fits(tmp_path / "cube.fits", cube=1), chunks=chunks).compute()
    xr.testing.assert_identical(cube, flat)
    assert WCS(fits.Header(cube.attrs["wcs"])).naxis == 2


def test_energy_cube_of_two_bins_is_refused(tmp_path):
    path = write_fits(tmp_path / "cube.fits", cube=2)
    with pytest.raises(InputError, match=r"not a 2-D image .*third axis \(ENERGY\) has 2 bins"):
        read_maps(path)


def test_small_gzip_is_read_in_memory_and_large_one_refused(tmp_path, fits_file, monkeypatch):
    gz = write_fits(tmp_path / "maps.fits.gz")
    xr.testing.assert_identical(read_maps(gz), read_maps(fits_file))
    lazy = read_maps(gz, chunks=16)  # small: decompressed, then tiled
    assert lazy["counts"].chunks is not None
    monkeypatch.setattr("cwtflow.inputs.IN_MEMORY_BYTES", 1000)
    with pytest.raises(InputError, match=r"cwtflow convert maps\.fits\.gz"):
        read_maps(gz)


@pytest.mark.parametrize("cube", [None, 1])
def test_convert_gzip_equals_the_fits_file(tmp_path, fits_file, cube):
    gz = write_fits(tmp_path / "maps.fits.gz", cube=cube)
    out = convert_maps(gz, tmp_path / "maps.zarr", chunk=16)
    data = read_maps(out, chunks=16)
    assert data["counts"].chunks == ((16, 16, 16, 2), (16, 16, 16, 16, 6))
    xr.testing.assert_identical(data.compute(), read_maps(fits_file))
    assert zarr.open_array(str(out), path="counts").chunks == (16, 16)
    with pytest.raises(StoreError, match="output exists"):
        convert_maps(gz, out)
    convert_maps(gz, out, overwrite=True, chunk=64)
    assert read_maps(out, chunks=None)["counts"].equals(read_maps(fits_file)["counts"])


# --------------------------------------------------------------------------------------------
# Zarr inputs


def test_zarr_input_written_by_xarray(tmp_path, fits_file):
    eager = read_maps(fits_file)
    eager.chunk(16).to_zarr(tmp_path / "maps.zarr")
    data = read_maps(tmp_path / "maps.zarr", chunks=16)
    assert data["counts"].chunks is not None
    xr.testing.assert_identical(data.compute(), eager)
    xr.testing.assert_identical(read_maps(tmp_path / "maps.zarr"), eager)  # small: in memory


def test_zarr_input_written_by_plain_zarr(tmp_path, fits_file):
    eager = read_maps(fits_file)
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    for name in ("counts", "background"):
        group.create_array(name, data=eager[name].values.astype(np.float32), chunks=(25, 35))
    group.attrs["wcs"] = wcs_to_attrs(default_wcs(SHAPE))
    data = read_maps(tmp_path / "plain.zarr", chunks=25)
    assert set(data.data_vars) == {"counts", "background"}
    np.testing.assert_array_equal(data["counts"].values, eager["counts"].values)
    float32 = eager["background"].values.astype(np.float32)
    np.testing.assert_array_equal(data["background"].values, float32)
    np.testing.assert_array_equal(data["lon"].values, eager["lon"].values)
    del group.attrs["wcs"]
    with pytest.raises(InputError, match="no WCS"):
        read_maps(tmp_path / "plain.zarr")


def test_history_store_inputs_are_read_back(tmp_path, fits_file):
    data = read_maps(fits_file)
    CWT(CWTKernels(1, 1.5, 1.4), max_iter=1).analyze(data, store=tmp_path / "run.zarr")
    xr.testing.assert_identical(read_maps(tmp_path / "run.zarr"), data)


def test_galactic_centre_fits_has_continuous_1d_coordinates(fits_file):
    data = read_maps(fits_file)
    lon = data["lon"].values
    assert data["lon"].dims == ("x",) and lon.shape == (SHAPE[1],)
    assert lon[0] > 0 > lon[-1] and np.all(np.diff(lon) < 0)  # across l = 0, no 360 jump


# --------------------------------------------------------------------------------------------
# Memory of a conversion (subprocess, peak RSS)

_PEAK_RSS = """
import sys
from cwtflow.convert import convert_maps
def hwm():  # this process's peak RSS, KiB (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
base = hwm()
convert_maps(sys.argv[1], sys.argv[2], chunk=int(sys.argv[3]))
print(base, hwm())
"""


@pytest.mark.slow
def test_convert_memory_does_not_grow_with_the_map(tmp_path):
    """Peak RSS of `convert_maps` on a gzip 4096 x 4096 map (float32 counts and background:
    128 MiB as float64 each) stays within a band of rows and a few chunks."""
    shape = (4096, 4096)
    header = default_wcs(shape).to_header()
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, shape).astype(np.float32)
    hdus = [fits.PrimaryHDU(counts, header=header), fits.ImageHDU(counts, name="BACKGROUND")]
    hdus[0].header["EXTNAME"] = "COUNTS"
    hdus[1].header.update(header)
    fits.HDUList(hdus).writeto(tmp_path / "big.fits")
    del counts, hdus
    with (
        open(tmp_path / "big.fits", "rb") as raw,
        gzip.open(tmp_path / "big.fits.gz", "wb", compresslevel=1) as packed,
    ):
        shutil.copyfileobj(raw, packed)  # level 1: astropy's default level takes minutes
    (tmp_path / "big.fits").unlink()
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK_RSS), str(tmp_path / "big.fits.gz"),
         str(tmp_path / "big.zarr"), "512"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    base, peak = (int(v) for v in run.stdout.split())  # KiB (Linux)
    grown = (peak - base) / 1024
    assert grown < 100, f"peak RSS grew by {grown:.0f} MiB"  # one map as float64: 128 MiB
    out = read_maps(tmp_path / "big.zarr", chunks=1024)
    with dask.config.set(scheduler="synchronous"):
        assert float(out["counts"][:8, :8].sum()) >= 0
