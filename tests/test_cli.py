"""Command line: run / demo / info end to end, and one-line refusals of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
import xarray as xr
from astropy.table import Table
from click.testing import CliRunner
from helpers import SURVEY_FILE, random_arrays
from test_io import BAD_MAPS, maps_hdus

import cwtflow
from cwtflow.cli import DEMO_FILES, cli
from cwtflow.cli_demo import DEMO_KERNELS, DEMO_SETTINGS
from cwtflow.io import read_maps, write_maps
from cwtflow.state_files import read_state

KERNEL_ARGS = ["--n-scale", "2", "--min-scale", "1.5", "--step-scale", "1.4"]


def invoke(*args: str | Path):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_refused(result, folder: Path, before: dict[str, bytes], *words: str) -> None:
    """Non-zero exit, exactly one line on stderr naming the problem, nothing written."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cwtflow: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert snapshot(folder) == before


@pytest.fixture
def maps_file(tmp_path) -> Path:
    counts, background = random_arrays(4, (30, 40))
    return write_maps(cwtflow.make_maps(counts, background), tmp_path / "maps.fits")


def test_run_writes_what_the_api_computes(tmp_path, maps_file):
    out = tmp_path / "result.fits"
    result = invoke("run", maps_file, "--out", out, *KERNEL_ARGS, "--max-iter", "3", "--tol", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (3 iterations, not converged")
    logged = [line for line in result.stderr.splitlines() if line.startswith("iteration")]
    assert [line.split(":")[0] for line in logged] == ["iteration 1", "iteration 2", "iteration 3"]
    assert "residual variance" in logged[0] and "variance ratio n/a" in logged[0]
    assert "variance ratio" in logged[1] and "support" in logged[1]
    cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 1.5, 1.4), max_iter=3, tol=0.0)
    expected = cwt.analyze(read_maps(maps_file))
    xr.testing.assert_identical(read_state(out), expected)


@pytest.mark.slow
def test_run_cutout_plot_quiet_and_overwrite(tmp_path, maps_file):
    out, png = tmp_path / "cut.fits.gz", tmp_path / "cut.png"
    args = ["run", maps_file, "-o", out, *KERNEL_ARGS, "--max-iter", "2"]
    cut = ["--center", "359.9", "0.3", "--width", "2.0", "1.5", "-q"]
    result = invoke(*args, *cut, "--plot", png)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert read_state(out).sizes == {"y": 15, "x": 20, "scale": 2}
    assert png.read_bytes()[:4] == b"\x89PNG"
    before = snapshot(tmp_path)
    assert_refused(invoke(*args, *cut), tmp_path, before, "output file exists", "--overwrite")
    result = invoke(*args, "--width", "1", "1", "-q", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_state(out).sizes == {"y": 10, "x": 10, "scale": 2}


@pytest.mark.parametrize("case", sorted(BAD_MAPS))
def test_run_refuses_bad_maps(tmp_path, case):
    mutate, words = BAD_MAPS[case]
    mutate(maps_hdus()).writeto(tmp_path / "bad.fits")
    before = snapshot(tmp_path)
    result = invoke("run", tmp_path / "bad.fits", "--out", tmp_path / "out.fits")
    assert_refused(result, tmp_path, before, *words)
    assert result.exit_code == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--n-scale", "0"], ["--n-scale", "0"]),
        (["--n-scale", "two"], ["--n-scale", "two"]),
        (["--min-scale", "0"], ["--min-scale"]),
        (["--step-scale", "1.0"], ["--step-scale"]),
        (["--max-iter", "0"], ["--max-iter"]),
        (["--tol", "-1"], ["--tol"]),
        (["--threshold", "nan"], ["significance_threshold must be a finite number above 0"]),
        (["--island-threshold", "inf"], ["significance_island_threshold"]),
        (["--wrap-lon", "maybe"], ["--wrap-lon"]),
        (["--wrap-lon", "yes"], ["wrap_lon=True needs a CAR map spanning 360 deg"]),
        (["--width", "0", "1"], ["--width"]),
        (["--center", "0", "0"], ["--center needs --width"]),
        (["--center", "180", "0", "--width", "1", "1"], ["does not fit the map"]),
        (["--counts-hdu", "NOPE"], ["'NOPE' not found", "COUNTS, BACKGROUND"]),
        (["--exposure-hdu", "7"], ["HDU 7 not found"]),
        (["--unknown"], ["No such option", "--unknown"]),
    ],
)
def test_run_refuses_bad_parameters(tmp_path, maps_file, args, words):
    before = snapshot(tmp_path)
    result = invoke("run", maps_file, "--out", tmp_path / "out.fits", *args)
    assert_refused(result, tmp_path, before, *words)


def test_run_refuses_bad_paths(tmp_path, maps_file):
    before = snapshot(tmp_path)
    run = ("run", maps_file, "--out")
    assert_refused(
        invoke("run", tmp_path / "nope.fits", "--out", tmp_path / "o.fits"),
        tmp_path,
        before,
        "file not found",
        "nope.fits",
    )
    assert_refused(
        invoke(*run, tmp_path / "missing" / "o.fits"),
        tmp_path,
        before,
        "output folder does not exist",
    )
    assert_refused(
        invoke(*run, maps_file / "o.fits"), tmp_path, before, "output folder is not a folder"
    )
    assert_refused(invoke(*run, tmp_path / "o.txt"), tmp_path, before, "unsupported output format")
    assert_refused(invoke(*run, maps_file), tmp_path, before, "output file exists")
    assert_refused(
        invoke(*run, tmp_path / "o.fits", "--plot", maps_file),
        tmp_path,
        before,
        "output file exists",
        "maps.fits",
    )
    assert_refused(invoke("run", maps_file), tmp_path, before, "Missing option '--out'")


def test_info_prints_the_tables(tmp_path, maps_file):
    out = tmp_path / "result.fits"
    assert invoke("run", maps_file, "-o", out, *KERNEL_ARGS, "--max-iter", "2", "-q").exit_code == 0
    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith(f"{out}: 30 x 40 pixels, 2 scales")
    for heading in ("Kernels", "Parameters", "Iterations (run: 2, converged: no)", "Metrics"):
        assert f"\n{heading}\n" in text
    for row in (
        "Number of scales",
        "Kernel 1 max",
        "significance_threshold",
        "residual_variance",
        "model_plus_approx",
        "transform_3d",
        "Sum values",
    ):
        assert row in text
    before = snapshot(tmp_path)
    assert_refused(invoke("info", maps_file), tmp_path, before, "not a cwtflow state file")
    assert_refused(invoke("info", tmp_path / "nope.fits"), tmp_path, before, "file not found")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--size", "60", "90", "--n-sources", "3", "--seed", "7", "--max-iter", "3"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_FILES.values())
    *written, matched = result.stdout.splitlines()
    assert [line.split()[1] for line in written] == list(DEMO_FILES.values())
    assert matched.startswith("found ") and "of 3 true sources" in matched
    maps, truth = cwtflow.simulate_sky((60, 90), n_sources=3, seed=7)
    xr.testing.assert_identical(read_maps(DEMO_FILES["maps"]), maps)
    sources = Table.read(DEMO_FILES["sources"], format="ascii.ecsv")
    assert len(sources) == 3 and sources["lon"].unit == u.deg
    np.testing.assert_array_equal(sources["counts"], truth["counts"])
    settings = {**DEMO_SETTINGS, "max_iter": 3}
    expected = cwtflow.CWT(cwtflow.CWTKernels(**DEMO_KERNELS), **settings).analyze(maps)
    xr.testing.assert_identical(read_state(DEMO_FILES["result"]), expected)
    assert Path(DEMO_FILES["plot"]).read_bytes()[:4] == b"\x89PNG"
    before = snapshot(tmp_path)
    assert_refused(invoke(*args), tmp_path, before, "output file exists", "--overwrite")


@pytest.mark.slow
def test_demo_out_folder_and_refusals(tmp_path):
    folder = tmp_path / "a" / "b"
    small = ["--size", "40", "50", "--n-sources", "1", "--max-iter", "1", "-q", *KERNEL_ARGS]
    result = invoke("demo", "--out", folder, "--overwrite", *small)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted(DEMO_FILES.values())
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    assert_refused(
        invoke("demo", "--out", tmp_path / "file" / "d", *small),
        tmp_path,
        before,
        "is not a folder",
    )
    assert_refused(
        invoke("demo", "--out", tmp_path / "c", "--size", "15", "15", "--n-sources", "1"),
        tmp_path,
        before,
        "too small",
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_console_entry_point_one_line_error(tmp_path):
    """The real process: exit status 1, one stderr line, no traceback, nothing written."""
    code = "from cwtflow.cli import main; main()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            str(tmp_path / "nope.fits"),
            "--out",
            str(tmp_path / "o.fits"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"cwtflow: error: file not found: {tmp_path / 'nope.fits'}"]
    assert list(tmp_path.iterdir()) == []


def test_run_survey_cutout_matches_the_api(tmp_path, shared_data):
    out = tmp_path / "survey.fits"
    survey = shared_data / SURVEY_FILE
    result = invoke(
        "run",
        survey,
        "-o",
        out,
        "--width",
        "20",
        "10",
        "--threshold",
        "2.0",
        "--max-iter",
        "2",
        "-q",
    )
    assert result.exit_code == 0, result.output
    data = read_maps(survey)
    cut = cwtflow.cutout(data, cwtflow.map_center(data), (20, 10) * u.deg)
    cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 6.0, 1.3), significance_threshold=2.0, max_iter=2)
    state = read_state(out)
    assert state.sizes == {"y": 100, "x": 200, "scale": 2}
    assert float(state["counts"].sum()) == 8889
    xr.testing.assert_identical(state, cwt.analyze(cut))
