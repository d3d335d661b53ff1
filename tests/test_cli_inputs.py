"""Command line and inputs: ``cwtflow convert``, ``--background/--exposure FILE[HDU]``, lazy
reads in ``cwtflow run``, defaults shared with the API, and a start that imports nothing heavy."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
from astropy.io import fits
from test_cli import KERNEL_ARGS, invoke
from test_inputs import write_fits

from cwtflow.catalog import find_sources
from cwtflow.defaults import CATALOG_DEFAULTS, CWT_DEFAULTS
from cwtflow.engine import CWT
from cwtflow.maps import default_wcs
from cwtflow.state_files import read_state

RUN = ["--max-iter", "2", "--tol", "0", "--quiet", *KERNEL_ARGS]


def test_convert_then_run_equals_a_run_on_the_fits_file(tmp_path):
    gz = write_fits(tmp_path / "maps.fits.gz", (40, 60))
    result = invoke("convert", gz, tmp_path / "maps.zarr", "--chunk", "16")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {tmp_path / 'maps.zarr'}\n"
    for name, source in (("fits", gz), ("zarr", tmp_path / "maps.zarr")):
        out = tmp_path / f"{name}.fits"
        result = invoke("run", source, "--out", out, *RUN)
        assert result.exit_code == 0, result.output
    a, b = read_state(tmp_path / "fits.fits"), read_state(tmp_path / "zarr.fits")
    np.testing.assert_array_equal(a["counts"].values, b["counts"].values)
    np.testing.assert_allclose(a["model"].values, b["model"].values, atol=1e-12)
    refused = invoke("convert", gz, tmp_path / "maps.zarr")
    assert refused.exit_code == 1 and "output exists" in refused.stderr
    assert invoke("convert", gz, tmp_path / "maps.fits").exit_code == 2


def test_run_with_background_and_exposure_files(tmp_path):
    path = write_fits(tmp_path / "maps.fits", (30, 40))
    header = default_wcs((30, 40)).to_header()
    with fits.open(path) as hdul:
        background, counts = hdul["BACKGROUND"].data, hdul["COUNTS"].data
        fits.HDUList([fits.PrimaryHDU(counts, header=header)]).writeto(tmp_path / "counts.fits")
        fits.HDUList(
            [fits.PrimaryHDU(), fits.ImageHDU(background, header=header, name="BKG")]
        ).writeto(tmp_path / "bkg.fits")
    args = ["--counts-hdu", "0", "--background", f"{tmp_path / 'bkg.fits'}[BKG]"]
    result = invoke("run", tmp_path / "counts.fits", "--out", tmp_path / "a.fits", *args, *RUN)
    assert result.exit_code == 0, result.output
    result = invoke("run", path, "--out", tmp_path / "b.fits", "--chunks", "16", "16", *RUN)
    assert result.exit_code == 0, result.output  # read lazily, in the run's tiles
    a, b = read_state(tmp_path / "a.fits"), read_state(tmp_path / "b.fits")
    np.testing.assert_allclose(a["model"].values, b["model"].values, atol=1e-12)
    bad = invoke("run", path, "--out", tmp_path / "c.fits", "--exposure", "nope.fits", *RUN)
    assert bad.exit_code == 1 and "file not found" in bad.stderr


def test_cli_defaults_are_the_api_defaults():
    signature = inspect.signature(CWT.__init__).parameters
    assert {k: signature[k].default for k in CWT_DEFAULTS} == CWT_DEFAULTS
    catalog = inspect.signature(find_sources).parameters
    assert {k: catalog[k].default for k in CATALOG_DEFAULTS} == CATALOG_DEFAULTS


def test_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom cwtflow.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('numpy', 'dask', 'xarray', 'astropy', 'zarr') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "convert" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
