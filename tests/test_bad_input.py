"""A hostile-input corpus: every bad argument or file is refused with a `CWTFlowError`
naming the problem (API), or with one ``cwtflow: error:`` line, a non-zero exit, no traceback,
nothing written and in under 5 s (command line). Includes the cases of issue 13's tester."""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from helpers import random_arrays
from test_io import maps_hdus

import cwtflow
from cwtflow import (
    CWT,
    CWTFlowError,
    CWTKernels,
    InputError,
    NotFoundError,
    ParameterError,
    ResourceError,
    StoreError,
)
from cwtflow.cli import cli

SHAPE = (30, 40)
SMALL = CWTKernels(2, 1.0, 1.5)


# --------------------------------------------------------------------------------------------
# Inputs shared by the cases


def _maps(**scaled: float) -> xr.Dataset:
    counts, background = random_arrays(3, SHAPE)
    data = cwtflow.make_maps(counts, background)
    for name, factor in scaled.items():
        data[name] = data[name] * factor
    return data


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    return _maps()


@pytest.fixture(scope="module")
def state(data: xr.Dataset) -> xr.Dataset:
    return CWT(SMALL, max_iter=2, significance_threshold=2.0).analyze(data)


@pytest.fixture(scope="module")
def history(tmp_path_factory, data: xr.Dataset) -> cwtflow.History:
    store = tmp_path_factory.mktemp("store") / "run.zarr"
    CWT(SMALL, max_iter=2).analyze(data, store=store)
    return cwtflow.open_history(store)


@pytest.fixture(scope="module")
def files(tmp_path_factory, data: xr.Dataset) -> dict[str, Path]:
    """Input files of the cases, in a folder of their own (outputs go elsewhere)."""
    folder = tmp_path_factory.mktemp("inputs")
    good = cwtflow.write_maps(data, folder / "maps.fits")
    out = {"maps": good}
    for name in ("COUNTS", "BACKGROUND", "EXPOSURE"):
        hdul = maps_hdus(SHAPE)
        hdul[name].data = np.full(SHAPE, 1e300)
        hdul.writeto(folder / f"huge-{name.lower()}.fits")
        out[f"huge-{name.lower()}"] = folder / f"huge-{name.lower()}.fits"
    raw = gzip.compress(good.read_bytes())
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2 : len(raw) // 2 + 64] = b"x" * 64
    (folder / "corrupt.fits.gz").write_bytes(bytes(corrupt))
    out["corrupt"] = folder / "corrupt.fits.gz"
    (folder / "empty.fits").write_bytes(b"")
    out["empty"] = folder / "empty.fits"
    (folder / "truncated.fits").write_bytes(good.read_bytes()[:4000])
    out["truncated"] = folder / "truncated.fits"
    (folder / "a-folder.fits").mkdir()
    out["folder"] = folder / "a-folder.fits"
    return out


# --------------------------------------------------------------------------------------------
# API: (call, error class, message pattern); the call takes a dict of the fixtures


def _center(d: xr.Dataset):
    return cwtflow.map_center(d)


def _shifted_state(s: xr.Dataset) -> xr.Dataset:
    return s.isel(x=slice(0, 20))


API_CASES: dict[str, tuple[Callable[[dict], object], type[CWTFlowError], str]] = {
    # kernels: the tester's cases and their kin
    "kernels 200 scales": (lambda f: CWTKernels(200, 6.0, 1.3), ParameterError, "n_scale"),
    "kernels 40 scales": (lambda f: CWTKernels(40, 6.0, 1.3), ResourceError, "kernels too large"),
    "min_scale 1e5": (lambda f: CWTKernels(2, 1e5, 1.3), ResourceError, "more than 4097 pixels"),
    "min_scale 1e-9": (lambda f: CWTKernels(2, 1e-9, 1.3), ParameterError, "at least 0.5"),
    "min_scale 0.3": (lambda f: CWTKernels(2, 0.3, 1.3), ParameterError, "min_scale"),
    "min_scale inf": (lambda f: CWTKernels(2, np.inf, 1.3), ParameterError, "min_scale"),
    "n_scale string": (lambda f: CWTKernels("2", 1.0, 1.5), ParameterError, "n_scale"),
    "n_scale None": (lambda f: CWTKernels(None, 1.0, 1.5), ParameterError, "n_scale"),
    "min_scale string": (lambda f: CWTKernels(2, "1", 1.5), ParameterError, "min_scale"),
    "min_scale None": (lambda f: CWTKernels(2, None, 1.5), ParameterError, "min_scale"),
    "step_scale None": (lambda f: CWTKernels(2, 1.0, None), ParameterError, "step_scale"),
    "step_scale 1": (lambda f: CWTKernels(2, 1.0, 1.0), ParameterError, "step_scale"),
    "kernels over 1 GiB": (lambda f: CWTKernels(100, 100.0, 1.01), ResourceError, "GiB"),
    "from_dict incomplete": (
        lambda f: CWTKernels.from_dict({"n_scale": 2}),
        InputError,
        "incomplete",
    ),
    # estimator settings
    "threshold string": (
        lambda f: CWT(SMALL, significance_threshold="3"),
        ParameterError,
        "significance_threshold",
    ),
    "threshold None": (
        lambda f: CWT(SMALL, significance_threshold=None),
        ParameterError,
        "significance_threshold",
    ),
    "threshold 0": (
        lambda f: CWT(SMALL, significance_threshold=0),
        ParameterError,
        "above 0",
    ),
    "island string": (
        lambda f: CWT(SMALL, significance_island_threshold="x"),
        ParameterError,
        "significance_island_threshold",
    ),
    "max_iter string": (lambda f: CWT(SMALL, max_iter="10"), ParameterError, "max_iter"),
    "max_iter 0": (lambda f: CWT(SMALL, max_iter=0), ParameterError, "max_iter"),
    "tol None": (lambda f: CWT(SMALL, tol=None), ParameterError, "tol"),
    "fft_workers 0": (lambda f: CWT(SMALL, fft_workers=0), ParameterError, "fft_workers"),
    "fft_workers 1.5": (lambda f: CWT(SMALL, fft_workers=1.5), ParameterError, "fft_workers"),
    "remove_isolated string": (
        lambda f: CWT(SMALL, remove_isolated="yes"),
        ParameterError,
        "remove_isolated",
    ),
    "wrap_lon string": (lambda f: CWT(SMALL, wrap_lon="auto"), ParameterError, "wrap_lon"),
    "kernels string": (lambda f: CWT("kernels"), ParameterError, "CWTKernels"),
    # analyze arguments and resources
    "chunks triple": (
        lambda f: CWT(SMALL).analyze(f["data"], chunks=(1, 2, 3)),
        ParameterError,
        "chunks",
    ),
    "chunks string": (
        lambda f: CWT(SMALL).analyze(f["data"], chunks="big"),
        ParameterError,
        "chunk",
    ),
    "chunks 0": (lambda f: CWT(SMALL).analyze(f["data"], chunks=0), ParameterError, "chunk"),
    "chunks dict z": (
        lambda f: CWT(SMALL).analyze(f["data"], chunks={"z": 3}),
        ParameterError,
        "'y' and/or 'x'",
    ),
    "too many tiles": (
        lambda f: CWT(SMALL).analyze(
            cwtflow.make_maps(np.ones((400, 300)), np.ones((400, 300))), chunks=1
        ),
        ResourceError,
        "too many tiles",
    ),
    "callback not callable": (
        lambda f: CWT(SMALL).analyze(f["data"], callback=3),
        ParameterError,
        "callback",
    ),
    "store not a path": (
        lambda f: CWT(SMALL).analyze(f["data"], store=3),
        ParameterError,
        "store must be a path",
    ),
    "resume string": (
        lambda f: CWT(SMALL).analyze(f["data"], resume="yes"),
        ParameterError,
        "resume",
    ),
    "kernel vs map": (
        lambda f: CWT(CWTKernels(2, 100.0, 1.3)).analyze(f["data"]),
        ResourceError,
        "kernels too large for the map",
    ),
    "counts 1e300": (
        lambda f: CWT(SMALL).analyze(_maps(counts=1e300)),
        InputError,
        "counts contains pixels too large",
    ),
    "background 1e300": (
        lambda f: CWT(SMALL).analyze(_maps(background=1e300)),
        InputError,
        "background contains pixels too large",
    ),
    "garbage wcs": (
        lambda f: CWT(SMALL).analyze(f["data"].assign_attrs(wcs="garbage")),
        InputError,
        "not a usable WCS",
    ),
    "garbage wcs cards": (
        lambda f: cwtflow.wcs_from_attrs({"wcs": {"NAXIS": "two", "CTYPE1": 5}}),
        InputError,
        "WCS",
    ),
    "attrs not a mapping": (lambda f: cwtflow.wcs_from_attrs(5), InputError, "mapping"),
    "analyze a string": (lambda f: CWT(SMALL).analyze("maps"), InputError, "xarray.Dataset"),
    "complex pixels in a Dataset": (
        lambda f: cwtflow.validate_maps(f["data"].assign(counts=f["data"]["counts"] * 1j)),
        InputError,
        "real numbers",
    ),
    # make_maps and cutout
    "make_maps 0 x 0": (
        lambda f: cwtflow.make_maps(np.zeros((0, 0)), np.zeros((0, 0))),
        InputError,
        "empty map",
    ),
    "make_maps complex": (
        lambda f: cwtflow.make_maps(np.ones(SHAPE) * 1j, np.ones(SHAPE)),
        InputError,
        "real numbers",
    ),
    "make_maps strings": (
        lambda f: cwtflow.make_maps([["a", "b"]], [[1.0, 2.0]]),
        InputError,
        "real numbers",
    ),
    "make_maps 1-D": (
        lambda f: cwtflow.make_maps(np.ones(5), np.ones(5)),
        InputError,
        "2-D",
    ),
    "make_maps shapes": (
        lambda f: cwtflow.make_maps(np.ones(SHAPE), np.ones((30, 39))),
        InputError,
        "shapes differ",
    ),
    "make_maps exposure shape": (
        lambda f: cwtflow.make_maps(np.ones(SHAPE), np.ones(SHAPE), exposure=np.ones((2, 2))),
        InputError,
        "exposure shapes differ",
    ),
    "make_maps wcs string": (
        lambda f: cwtflow.make_maps(np.ones(SHAPE), np.ones(SHAPE), wcs="GLON-CAR"),
        ParameterError,
        "wcs",
    ),
    "cutout zero width": (
        lambda f: cwtflow.cutout(f["data"], _center(f["data"]), 0 * u.deg),
        ParameterError,
        "positive",
    ),
    "cutout three widths": (
        lambda f: cwtflow.cutout(f["data"], _center(f["data"]), [1, 2, 3] * u.deg),
        ParameterError,
        "one or two",
    ),
    "cutout width in seconds": (
        lambda f: cwtflow.cutout(f["data"], _center(f["data"]), 1 * u.s),
        ParameterError,
        "angle",
    ),
    "cutout position string": (
        lambda f: cwtflow.cutout(f["data"], "centre", 1 * u.deg),
        ParameterError,
        "SkyCoord",
    ),
    # analyses and the history: lookups are NotFoundError (also KeyError)
    "image_metrics nope": (
        lambda f: cwtflow.image_metrics(f["state"], "nope"),
        NotFoundError,
        "'nope' is not a known image",
    ),
    "cube_metrics nope": (
        lambda f: cwtflow.cube_metrics(f["state"], "nope"),
        NotFoundError,
        "'nope' is not a known cube",
    ),
    "image_metrics number": (
        lambda f: cwtflow.image_metrics(f["state"], 3),
        ParameterError,
        "string",
    ),
    "images of no state": (
        lambda f: cwtflow.images(xr.Dataset()),
        InputError,
        "not a CWT state",
    ),
    "difference of shapes": (
        lambda f: cwtflow.difference(f["state"], _shifted_state(f["state"])),
        InputError,
        "different shapes",
    ),
    "difference with a string": (
        lambda f: cwtflow.difference(f["state"], "earlier"),
        InputError,
        "xarray.Dataset",
    ),
    "history state 99": (
        lambda f: f["history"].state(99),
        NotFoundError,
        "iteration 99 is not in the store",
    ),
    "history state string": (
        lambda f: f["history"].state("last"),
        ParameterError,
        "iteration must be an integer",
    ),
    "history stack nope": (
        lambda f: f["history"].stack("nope"),
        NotFoundError,
        "'nope' is not a state variable",
    ),
    # files
    "read_maps None": (lambda f: cwtflow.read_maps(None), InputError, "path must be a file"),
    "read_maps corrupt gzip": (
        lambda f: cwtflow.read_maps(f["files"]["corrupt"]),
        InputError,
        "cannot read .* as FITS",
    ),
    "read_maps empty file": (
        lambda f: cwtflow.read_maps(f["files"]["empty"]),
        InputError,
        "cannot read|empty",
    ),
    "read_maps HDU key list": (
        lambda f: cwtflow.read_maps(f["files"]["maps"], counts_hdu=["COUNTS"]),
        ParameterError,
        "HDU keys",
    ),
    "read_maps 1e300 counts": (
        lambda f: cwtflow.read_maps(f["files"]["huge-counts"]),
        InputError,
        "too large",
    ),
    "read_state None": (lambda f: cwtflow.read_state(None), StoreError, "path must be a file"),
    "read_state empty file": (
        lambda f: cwtflow.read_state(f["files"]["empty"]),
        StoreError,
        "cannot read|not a cwtflow",
    ),
    # plots, catalog, simulation
    "plot suffix xyz": (
        lambda f: _plot(f["state"], "p.xyz"),
        ParameterError,
        "image format",
    ),
    "plot dpi 0": (lambda f: _plot(f["state"], None, dpi=0), ParameterError, "dpi"),
    "plot cmap": (lambda f: _plot(f["state"], None, cmap="nope"), ParameterError, "colour map"),
    "plot ncols string": (lambda f: _plot(f["state"], None, ncols="2"), ParameterError, "ncols"),
    "catalog min_significance string": (
        lambda f: cwtflow.find_sources(f["state"], min_significance="5"),
        ParameterError,
        "min_significance",
    ),
    "catalog contrast None": (
        lambda f: cwtflow.find_sources(f["state"], contrast=None),
        ParameterError,
        "contrast",
    ),
    "catalog psf string": (
        lambda f: cwtflow.find_sources(f["state"], psf="2"),
        ParameterError,
        "psf: give an angle",
    ),
    "catalog deblend string": (
        lambda f: cwtflow.find_sources(f["state"], deblend="no"),
        ParameterError,
        "deblend",
    ),
    "simulate psf string": (
        lambda f: cwtflow.simulate_sky((50, 60), psf_sigma="x"),
        InputError,
        "psf_sigma",
    ),
    "simulate shape 0": (lambda f: cwtflow.simulate_sky((0, 5)), InputError, "shape"),
}


def _plot(state: xr.Dataset, path: str | None, **kwargs):
    return cwtflow.plot_images(state, path, **kwargs)


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses(case, data, state, history, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plot that is not refused would land here
    call, error, pattern = API_CASES[case]
    fixtures = {"data": data, "state": state, "history": history, "files": files}
    start = time.perf_counter()
    with pytest.raises(error, match=pattern) as caught:
        call(fixtures)
    assert time.perf_counter() - start < 5
    assert isinstance(caught.value, CWTFlowError)
    if error is NotFoundError:
        assert isinstance(caught.value, KeyError)  # old `except KeyError` code still works
        assert str(caught.value) == caught.value.args[0]  # not quoted like a KeyError
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Command line: (arguments, words of the one error line); {name} is an input file of `files`

RUN = ["run", "{maps}", "--out", "{out}/out.fits"]
CLI_CASES: dict[str, tuple[list[str], list[str]]] = {
    # the tester's cases
    "counts 1e300": (["run", "{huge-counts}", "--out", "{out}/o.fits"], ["counts", "too large"]),
    "background 1e300": (
        ["run", "{huge-background}", "--out", "{out}/o.fits"],
        ["background", "too large"],
    ),
    "exposure 1e300": (
        ["run", "{huge-exposure}", "--out", "{out}/o.fits"],
        ["exposure", "too large"],
    ),
    "min-scale 1e5": ([*RUN, "--min-scale", "1e5"], ["kernels too large", "4097"]),
    "n-scale 40": ([*RUN, "--n-scale", "40"], ["kernels too large"]),
    "plot p.xyz": ([*RUN, "--plot", "{out}/p.xyz"], ["image format", "p.xyz", ".png"]),
    "chunks 1 1": ([*RUN, "--chunks", "1", "1"], ["--chunks", "at least 16"]),
    "min-scale 1e-9": ([*RUN, "--min-scale", "1e-9"], ["--min-scale", "0.5"]),
    # kernels
    "n-scale 101": ([*RUN, "--n-scale", "101"], ["--n-scale", "101"]),
    "n-scale float": ([*RUN, "--n-scale", "2.5"], ["--n-scale"]),
    "min-scale 0.49": ([*RUN, "--min-scale", "0.49"], ["--min-scale"]),
    "min-scale text": ([*RUN, "--min-scale", "big"], ["--min-scale"]),
    "step-scale 1": ([*RUN, "--step-scale", "1"], ["--step-scale"]),
    "step-scale 1e9": ([*RUN, "--step-scale", "1e9"], ["kernels too large"]),
    "largest kernel 5000 px": (
        [*RUN, "--n-scale", "1", "--min-scale", "600", "--step-scale", "1.05"],
        ["kernels too large", "4097"],
    ),
    "kernel vs map": (
        [*RUN, "--min-scale", "100", "--step-scale", "1.3"],
        ["kernels too large for the map", "30 x 40"],
    ),
    # estimator settings
    "threshold 0": ([*RUN, "--threshold", "0"], ["significance_threshold", "above 0"]),
    "threshold -1": ([*RUN, "--threshold", "-1"], ["significance_threshold"]),
    "threshold inf": ([*RUN, "--threshold", "inf"], ["significance_threshold"]),
    "threshold text": ([*RUN, "--threshold", "high"], ["--threshold"]),
    "island nan": ([*RUN, "--island-threshold", "nan"], ["significance_island_threshold"]),
    "max-iter 0": ([*RUN, "--max-iter", "0"], ["--max-iter"]),
    "tol -1": ([*RUN, "--tol", "-1"], ["--tol"]),
    "fft-workers 0": ([*RUN, "--fft-workers", "0"], ["--fft-workers"]),
    "wrap-lon yes": ([*RUN, "--wrap-lon", "yes"], ["360 deg"]),
    # tiles
    "chunks 15 64": ([*RUN, "--chunks", "15", "64"], ["--chunks", "at least 16"]),
    "chunks 0 5": ([*RUN, "--chunks", "0", "5"], ["--chunks"]),
    "chunks one value": ([*RUN, "--chunks", "32"], ["--chunks"]),
    # plot and outputs
    "plot without suffix": ([*RUN, "--plot", "{out}/p"], ["image format"]),
    "plot pgf": ([*RUN, "--plot", "{out}/p.pgf"], ["image format"]),
    "out suffix": (["run", "{maps}", "--out", "{out}/o.txt"], ["unsupported output format"]),
    # cutouts
    "width 0": ([*RUN, "--width", "0", "1"], ["--width"]),
    "center without width": ([*RUN, "--center", "0", "0"], ["--center needs --width"]),
    "center off the map": (
        [*RUN, "--center", "180", "0", "--width", "1", "1"],
        ["does not fit the map"],
    ),
    # input files
    "corrupt gzip": (["run", "{corrupt}", "--out", "{out}/o.fits"], ["cannot read", "FITS"]),
    "empty file": (["run", "{empty}", "--out", "{out}/o.fits"], ["cannot read"]),
    "truncated file": (["run", "{truncated}", "--out", "{out}/o.fits"], ["truncated.fits"]),
    "maps is a folder": (["run", "{folder}", "--out", "{out}/o.fits"], ["not a file"]),
    "counts HDU 99": ([*RUN, "--counts-hdu", "99"], ["HDU 99 not found"]),
    "info of maps": (["info", "{maps}"], ["not a cwtflow state file"]),
    "info of corrupt gzip": (["info", "{corrupt}"], ["corrupt.fits.gz"]),
    "catalog of maps": (
        ["catalog", "{maps}", "--out", "{out}/c.fits"],
        ["not a cwtflow state file"],
    ),
    "catalog suffix": (["catalog", "{maps}", "--out", "{out}/c.xyz"], ["catalog format"]),
    # demo
    "demo n-scale 40": (["demo", "--out", "{out}/d", "--n-scale", "40"], ["kernels too large"]),
    "demo min-scale 1e-9": (["demo", "--out", "{out}/d", "--min-scale", "1e-9"], ["0.5"]),
    "demo size too large": (
        ["demo", "--out", "{out}/d", "--size", "100000", "100000"],
        ["beyond the poles"],
    ),
    "demo size too small": (
        ["demo", "--out", "{out}/d", "--size", "15", "15", "--n-sources", "1"],
        ["too small"],
    ),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses(case, files, tmp_path):
    args, words = CLI_CASES[case]
    paths = {name: str(path) for name, path in files.items()}
    argv = [a.format(out=tmp_path, **paths) for a in args]
    before = _snapshot(tmp_path)
    start = time.perf_counter()
    result = CliRunner().invoke(cli, argv)
    elapsed = time.perf_counter() - start
    assert result.exit_code != 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cwtflow: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert _snapshot(tmp_path) == before
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 5, elapsed


def test_corpus_size():
    """The corpus holds at least 60 cases (issue 13)."""
    assert len(API_CASES) + len(CLI_CASES) >= 60
