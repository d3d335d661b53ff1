"""Command line, issue 14: what a user expects of `cwtflow run` / `catalog` / `demo` outputs —
history kept on request, resume from the store's parameters, quiet log files, provenance,
compact FITS results, consolidated zarr metadata, refusals that say what to do."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner
from helpers import random_arrays

import cwtflow
from cwtflow.cli import cli
from cwtflow.cli_demo import DEMO_KERNELS, DEMO_MATCH_RADIUS, DEMO_SETTINGS
from cwtflow.io import write_maps
from cwtflow.maps import sky_coordinates
from cwtflow.provenance import PACKAGES
from cwtflow.state import IMAGES, STATE_VARS
from cwtflow.state_files import read_state, write_state

KERNELS = ["--n-scale", "2", "--min-scale", "1.5", "--step-scale", "1.4"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def maps_file(tmp_path) -> Path:
    counts, background = random_arrays(4, (30, 40))
    return write_maps(cwtflow.make_maps(counts, background), tmp_path / "maps.fits")


@pytest.mark.slow
def test_keep_history_keeps_every_iteration(tmp_path, maps_file):
    store = tmp_path / "run.zarr"
    args = ["run", maps_file, *KERNELS, "--max-iter", "3", "--tol", "0", "-q"]
    assert invoke(*args, "--out", store, "--keep-history").exit_code == 0
    history = cwtflow.open_history(store)
    assert history.iterations == [0, 1, 2, 3]
    diff = history.difference(3, 2).compute()
    expected = history.state(3)["model"] - history.state(2)["model"]
    np.testing.assert_array_equal(diff["model"].values, expected.values)
    # the default keeps the newest iteration only, as --help says
    assert invoke(*args, "--out", tmp_path / "last.zarr").exit_code == 0
    assert cwtflow.open_history(tmp_path / "last.zarr").iterations == [3]
    help_text = " ".join(invoke("run", "--help").stdout.split())
    assert "default: only the newest" in help_text and "--keep-history" in help_text


def test_resume_takes_the_parameters_from_the_store(tmp_path, maps_file):
    options = ["--n-scale", "3", "--min-scale", "2", "--threshold", "2.5", "--tol", "0", "-q"]
    store = tmp_path / "run.zarr"
    first = invoke("run", maps_file, "--out", store, *options, "--max-iter", "2")
    assert first.exit_code == 0, first.output
    # an option given again must agree with the store
    refused = invoke("run", maps_file, "--out", store, "--resume", "--threshold", "3")
    assert refused.exit_code == 2
    assert "--threshold 3.0 differs from the run" in refused.stderr and "2.5" in refused.stderr
    resumed = invoke("run", maps_file, "--out", store, "--resume", "--max-iter", "4", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert "4 iterations" in resumed.stdout
    whole = tmp_path / "whole.fits"
    assert invoke("run", maps_file, "--out", whole, *options, "--max-iter", "4").exit_code == 0
    expected, got = read_state(whole), cwtflow.read_result(store).compute()
    assert got.attrs["parameters"] == expected.attrs["parameters"]
    for name in STATE_VARS:
        if name == "support":
            np.testing.assert_array_equal(got[name].values, expected[name].values)
        else:
            np.testing.assert_allclose(got[name].values, expected[name].values, atol=1e-10)
    provenance = zarr.open_group(str(store), mode="r").attrs["provenance"]
    assert "--resume" in provenance["command"]
    assert "--max-iter 2" in provenance["earlier"][0]["command"]


@pytest.mark.slow
def test_cluster_progress_in_a_log_file_is_quiet(tmp_path, maps_file):
    """stderr to a file (not a terminal): no task bar, no carriage returns, at most one line
    per iteration besides the cluster's own line."""
    log = tmp_path / "run.log"
    args = ["run", str(maps_file), "--out", str(tmp_path / "run.zarr"), *KERNELS]
    args += ["--max-iter", "3", "--tol", "0", "--workers", "2", "--chunks", "16", "20"]
    with log.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-c", "from cwtflow.cli import main; main()", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            check=False,
        )
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "task" not in text
    lines = text.splitlines()
    assert len([line for line in lines if line.startswith("iteration")]) == 3
    assert len(lines) <= 3 + 3, text  # + the cluster's lines (opened, closing)


def test_results_record_their_provenance(tmp_path, maps_file):
    out = tmp_path / "result.fits"
    assert invoke("run", maps_file, "--out", out, *KERNELS, "--max-iter", "2", "-q").exit_code == 0
    sha = hashlib.sha256(maps_file.read_bytes()).hexdigest()
    with fits.open(out) as hdul:
        header = hdul[0].header
        record = json.loads(header["CWTPROV"])
        assert header["DATE"] == record["date"] and header["SHA256_1"] == sha
        assert header["INPUT1"] == "maps.fits"
    assert record["inputs"] == [{"path": str(maps_file), "sha256": sha}]
    assert record["command"].startswith("cwtflow run ") and "--max-iter 2" in record["command"]
    assert list(record["versions"]) == list(PACKAGES)
    assert record["versions"]["cwtflow"] == cwtflow.__version__
    store = tmp_path / "run.zarr"
    done = invoke("run", maps_file, "--out", store, *KERNELS, "--max-iter", "2", "-q")
    assert done.exit_code == 0, done.output
    stored = zarr.open_group(str(store), mode="r").attrs["provenance"]
    assert stored["inputs"][0]["sha256"] == sha and "run.zarr" in stored["command"]
    catalog = tmp_path / "sources.fits"
    done = invoke("catalog", out, "--out", catalog, "--min-significance", "1")
    assert done.exit_code == 0, done.output
    meta = json.loads(Table.read(catalog).meta["CWTPROV"])
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["command"].startswith("cwtflow catalog ")


def _old_layout_bytes(state: xr.Dataset, path: Path) -> int:
    """Size of the state file as cwtflow wrote it before issue 14: every image (derived ones
    included) and cube uncompressed, counts as float64, lon/lat images."""
    imgs = cwtflow.images(state)
    arrays = [imgs[n].values for n in IMAGES] + [state[n].values for n in ("transform_3d",)]
    arrays += [state["error"].values, state["support"].values, state["exposure"].values]
    arrays += list(sky_coordinates(cwtflow.wcs_from_attrs(state.attrs), state["counts"].shape))
    hdus = [fits.PrimaryHDU()]
    hdus += [fits.ImageHDU(a.astype(np.uint8) if a.dtype == bool else a) for a in arrays]
    fits.HDUList(hdus).writeto(path)
    return path.stat().st_size


def test_fits_result_is_about_a_third_of_the_old_layout(tmp_path):
    """Measured: 1024 x 4096 simulated run (binsz 0.05, 2 iterations): 549.5 MB -> 181.5 MB
    (0.330). Lossless float64 compression depends on the content: smaller simulated maps
    give 0.33 to 0.35, hence the bound here."""
    maps, _ = cwtflow.simulate_sky((256, 1024), seed=0, binsz=0.2)
    state = cwtflow.CWT(cwtflow.CWTKernels(2, 6.0, 1.3), max_iter=2).analyze(maps)
    new = write_state(state, tmp_path / "new.fits").stat().st_size
    old = _old_layout_bytes(state, tmp_path / "old.fits")
    assert new <= 0.345 * old, (new, old)
    xr.testing.assert_identical(read_state(tmp_path / "new.fits"), state)


def test_open_zarr_on_a_store_does_not_warn(tmp_path, maps_file):
    store = tmp_path / "run.zarr"
    args = ["run", maps_file, "--out", store, *KERNELS, "--max-iter", "2", "--keep-history"]
    assert invoke(*args, "-q").exit_code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xr.open_zarr(store)
        group = xr.open_zarr(store, group="iterations/0001")
        xr.open_zarr(store, group="inputs")
    assert [str(w.message) for w in caught] == []
    # iteration groups carry their sky grid: WCS cards, and 1-D lon/lat on a CAR grid
    assert group.attrs["wcs"]["CTYPE1"] == "GLON-CAR"
    inputs = cwtflow.open_history(store).inputs
    np.testing.assert_array_equal(group["lon"].values, inputs["lon"].values)
    np.testing.assert_array_equal(group["lat"].values, inputs["lat"].values)


def test_stale_consolidated_metadata_is_not_trusted(tmp_path, maps_file):
    """A kill after an iteration was deleted but before the metadata was consolidated again:
    cwtflow reads the groups themselves, not the stale copy."""
    store = tmp_path / "run.zarr"
    args = ["run", maps_file, "--out", store, *KERNELS, "--max-iter", "3", "--tol", "0"]
    assert invoke(*args, "--keep-history", "-q").exit_code == 0
    shutil.rmtree(store / "iterations" / "0003")
    assert cwtflow.open_history(store).iterations == [0, 1, 2]


def test_width_larger_than_the_map_is_refused(tmp_path, maps_file):
    result = invoke("run", maps_file, "--out", tmp_path / "o.fits", "--width", "400", "10")
    assert result.exit_code == 2
    assert "--width 400 10 does not fit in the map" in result.stderr
    assert not (tmp_path / "o.fits").exists()


def test_catalog_suffix_errors_name_cli_options(tmp_path, maps_file):
    out = tmp_path / "result.fits"
    assert invoke("run", maps_file, "--out", out, *KERNELS, "--max-iter", "1", "-q").exit_code == 0
    for name in ("c.txt", "c.reg"):
        result = invoke("catalog", out, "--out", tmp_path / name)
        assert result.exit_code == 2
        message = result.stderr.split("(region files")[0]
        assert "format=" not in result.stderr and ".reg" not in message.replace(name, "")
        assert "--regions" in result.stderr


def test_quiet_and_verbose_before_or_after_the_command(tmp_path, maps_file):
    args = ["run", maps_file, *KERNELS, "--max-iter", "2"]
    quiet = invoke("-q", *args, "--out", tmp_path / "a.fits")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    loud = invoke(*args, "--out", tmp_path / "b.fits", "-v")
    assert loud.exit_code == 0 and loud.stderr.count("iteration ") == 2
    assert loud.stdout.startswith("wrote ")


@pytest.mark.slow
def test_demo_uses_the_settings_of_the_readme_pictures(tmp_path):
    path = Path(__file__).parents[1] / "docs" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", path)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    assert figures.KERNELS == DEMO_KERNELS and figures.SETTINGS == DEMO_SETTINGS
    assert figures.MATCH_RADIUS == DEMO_MATCH_RADIUS
    result = invoke("demo", "--out", tmp_path, "--size", "100", "200", "--n-sources", "6", "-q")
    assert result.exit_code == 0, result.output
    assert "converged" in result.stdout and "not converged" not in result.stdout
    last = result.stdout.splitlines()[-1]
    assert last.startswith("found ") and "of 6 true sources" in last
    catalog = cwtflow.read_catalog(tmp_path / "demo-catalog.ecsv")
    assert len(catalog) > 0 and (tmp_path / "demo-catalog.reg").exists()
