"""The public engine against the brute-force implementation of the specification."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import reference as ref
import xarray as xr
from astropy.wcs import WCS
from helpers import random_arrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cwtflow
from cwtflow import CWT, CWTKernels, InputError

# name -> (kernel parameters, CWT options); small scales keep the direct convolution fast.
PARAMETER_SETS = {
    "default": ((2, 1.0, 1.5), {}),
    "threshold_2": ((2, 1.0, 1.5), {"significance_threshold": 2.0}),
    "island": (
        (2, 1.0, 1.5),
        {"significance_threshold": 2.0, "significance_island_threshold": 3.0},
    ),
    "keep_isolated": ((2, 1.0, 1.5), {"significance_threshold": 2.0, "remove_isolated": False}),
    "island_keep_isolated": (
        (2, 1.0, 1.5),
        {
            "significance_threshold": 1.5,
            "significance_island_threshold": 2.5,
            "remove_isolated": False,
        },
    ),
    "three_scales": ((3, 0.8, 1.4), {"significance_threshold": 2.5}),
    "one_scale": ((1, 1.5, 2.0), {"significance_threshold": 2.0, "max_iter": 6}),
    "early_stop": ((2, 1.0, 1.5), {"significance_threshold": 2.0, "tol": 3e-3}),
    "one_iteration": ((2, 1.2, 1.3), {"significance_threshold": 1.0, "max_iter": 1}),
}
# A zero-background, zero-count region larger than every kernel above (largest side: 19 px).
ZERO_PATCH = (slice(8, 36), slice(20, 46))


def run_both(
    data: xr.Dataset, kernel_args: tuple, options: dict
) -> tuple[xr.Dataset, CWT, ref.Run]:
    """cwtflow (public API, history kept) and the brute force on the same maps and settings."""
    cwt = CWT(CWTKernels(*kernel_args), keep_history=True, **options)
    result = cwt.analyze(data)
    n_scale, min_scale, step_scale = kernel_args
    expected = ref.run(
        data["counts"].values,
        data["background"].values,
        n_scale=n_scale,
        min_scale=min_scale,
        step_scale=step_scale,
        max_iter=options.get("max_iter", 10),
        tol=options.get("tol", 1e-5),
        threshold=options.get("significance_threshold", 3.0),
        island_threshold=options.get("significance_island_threshold"),
        remove_isolated=options.get("remove_isolated", True),
        wrap_x=cwt.wraps(data),
    )
    return result, cwt, expected


def assert_run_matches(result: xr.Dataset, cwt: CWT, expected: ref.Run) -> None:
    assert result.attrs["iterations"] == expected.iterations
    assert result.attrs["converged"] == expected.converged
    np.testing.assert_allclose(result.attrs["residual_variance"], expected.variances, rtol=1e-10)
    assert len(cwt.history) == len(expected.history) == expected.iterations + 1
    for k, (state, expected_state) in enumerate(zip(cwt.history, expected.history, strict=True)):
        ref.assert_state_matches(state, expected_state, label=f"iteration {k}: ")
    ref.assert_state_matches(result, expected.state, label="result: ")


@pytest.mark.parametrize("zero_patch", [None, ZERO_PATCH], ids=["plain", "zero_patch"])
@pytest.mark.parametrize("name", list(PARAMETER_SETS))
def test_engine_matches_brute_force(name, zero_patch, random_maps):
    kernel_args, options = PARAMETER_SETS[name]
    data = random_maps(7, zero_patch=zero_patch)
    result, cwt, expected = run_both(data, kernel_args, options)
    assert expected.state["support"].any(), "parameter set finds nothing: the test would be weak"
    assert_run_matches(result, cwt, expected)


def test_threaded_ffts_match_brute_force(random_maps):
    kernel_args, options = PARAMETER_SETS["island"]
    data = random_maps(9, zero_patch=ZERO_PATCH)
    result, cwt, expected = run_both(data, kernel_args, {**options, "fft_workers": 2})
    assert_run_matches(result, cwt, expected)


def test_early_stop_set_converges(random_maps):
    kernel_args, options = PARAMETER_SETS["early_stop"]
    result, _, expected = run_both(random_maps(7), kernel_args, options)
    assert expected.converged and 1 < expected.iterations < 10
    assert result.attrs["converged"] and result.attrs["iterations"] == expected.iterations


def test_parameter_sets_exercise_cleaning():
    """The random maps hold isolated pixels and weak islands, so both cleaning rules matter."""
    counts, background = random_arrays(7)
    kernels = ref.Kernels(2, 1.0, 1.5)
    state = ref.iterate(
        ref.initial_state(counts, background, 2),
        kernels,
        {"threshold": 2.0, "island_threshold": None, "remove_isolated": False},
    )
    _, sig = ref.significance(state["transform_3d"], state["error"] ** 2)
    plain = [ref.clean(s, 2.0, remove_isolated=False, island_threshold=None) for s in sig]
    no_isolated = [ref.clean(s, 2.0, remove_isolated=True, island_threshold=None) for s in sig]
    islands = [ref.clean(s, 2.0, remove_isolated=False, island_threshold=3.0) for s in sig]
    assert any((a != b).any() for a, b in zip(plain, no_isolated, strict=True))
    assert any((a != b).any() for a, b in zip(plain, islands, strict=True))


def test_zero_background_patch_is_not_significant(random_maps):
    """Where E == 0 the reference divides by zero; cwtflow stores finite numbers there and
    never makes such a pixel significant (support only grows where E > 0)."""
    data = random_maps(3, zero_patch=ZERO_PATCH)
    result, cwt, expected = run_both(data, (2, 1.0, 1.5), {"significance_threshold": 2.0})
    assert (expected.state["error"] == 0).any()
    for k in range(1, len(cwt.history)):
        state, previous = cwt.history[k], cwt.history[k - 1]
        for name in state.data_vars:
            assert np.isfinite(state[name].values).all(), name
        added = state["support"].values & ~previous["support"].values
        assert added.any() or k > 1
        assert not added[expected.history[k]["error"] == 0].any()
    assert_run_matches(result, cwt, expected)


def allsky_maps(shape: tuple[int, int], seed: int) -> xr.Dataset:
    """A CAR map whose x axis spans 360 deg (wraps in longitude)."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    wcs.wcs.cdelt = [-360.0 / nx, 360.0 / nx]
    wcs.wcs.crval = [0.0, 0.0]
    wcs.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    counts, background = random_arrays(seed, shape, n_sources=6)
    # a source on the seam so that components and convolutions cross it
    counts[ny // 2, :2] += 12
    counts[ny // 2, -2:] += 12
    return cwtflow.make_maps(counts, background, wcs)


@pytest.mark.parametrize("wrap_lon", [None, False])
def test_allsky_map_matches_brute_force(wrap_lon):
    data = allsky_maps((24, 60), 5)
    options = {"significance_threshold": 2.0, "wrap_lon": wrap_lon, "max_iter": 4}
    result, cwt, expected = run_both(data, (2, 1.0, 1.5), options)
    assert cwt.wraps(data) is (wrap_lon is None)
    assert expected.state["support"][:, :, [0, -1]].any()
    assert_run_matches(result, cwt, expected)


def test_wrap_changes_only_the_seam():
    data = allsky_maps((24, 60), 5)
    kernels = CWTKernels(2, 1.0, 1.5)
    wrapped = CWT(kernels, max_iter=1, wrap_lon=True).analyze(data)
    plain = CWT(kernels, max_iter=1, wrap_lon=False).analyze(data)
    h = kernels.halo
    middle = slice(h, data.sizes["x"] - h)
    diff = np.abs(wrapped["transform_3d"] - plain["transform_3d"]).values
    assert diff[:, :, :h].max() > 1e-3
    assert diff[:, :, middle].max() < 1e-12


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    ny=st.integers(1, 26),
    nx=st.integers(1, 30),
    level=st.sampled_from([0.0, 0.05, 0.5, 3.0]),
    n_sources=st.integers(0, 4),
    patch=st.booleans(),
    n_scale=st.integers(1, 3),
    min_scale=st.floats(0.5, 1.6),
    step_scale=st.floats(1.1, 2.0),
    threshold=st.floats(0.5, 4.0),
    island=st.one_of(st.none(), st.floats(0.0, 2.0)),
    remove_isolated=st.booleans(),
    max_iter=st.integers(1, 5),
    tol=st.sampled_from([1e-5, 1e-2]),
)
def test_property_engine_matches_brute_force(
    seed,
    ny,
    nx,
    level,
    n_sources,
    patch,
    n_scale,
    min_scale,
    step_scale,
    threshold,
    island,
    remove_isolated,
    max_iter,
    tol,
):
    zero_patch = (slice(0, ny // 2), slice(nx // 3, nx)) if patch else None
    counts, background = random_arrays(
        seed, (ny, nx), level=level, n_sources=n_sources, zero_patch=zero_patch
    )
    data = cwtflow.make_maps(counts, background)
    options = {
        "significance_threshold": threshold,
        "significance_island_threshold": None if island is None else threshold + island,
        "remove_isolated": remove_isolated,
        "max_iter": max_iter,
        "tol": tol,
    }
    result, cwt, expected = run_both(data, (n_scale, min_scale, step_scale), options)
    assert_run_matches(result, cwt, expected)


def test_data_is_not_modified(random_maps):
    data = random_maps(11, zero_patch=ZERO_PATCH)
    before = copy.deepcopy(data)
    counts = data["counts"].values
    result = CWT(CWTKernels(2, 1.0, 1.5), significance_threshold=2.0).analyze(data)
    xr.testing.assert_identical(data, before)
    assert data.attrs == before.attrs
    assert data["counts"].values is counts
    assert not np.shares_memory(result["model"].values, counts)


def test_history_and_attrs(random_maps):
    cwt = CWT(CWTKernels(2, 1.0, 1.5), significance_threshold=2.0, keep_history=True, max_iter=3)
    result = cwt.analyze(random_maps(1))
    assert result.attrs["iterations"] == 3 and len(cwt.history) == 4
    assert not cwt.history[0]["support"].any() and not cwt.history[0]["model"].any()
    assert [s.attrs.get("iteration") for s in cwt.history[1:]] == [1, 2, 3]
    assert list(result["scale"].values) == pytest.approx([1.0, 1.5])
    assert result["transform_3d"].dims == ("scale", "y", "x")
    assert result["model"].dims == ("y", "x")
    no_history = CWT(CWTKernels(2, 1.0, 1.5), significance_threshold=2.0, max_iter=3)
    xr.testing.assert_equal(no_history.analyze(random_maps(1))["model"], result["model"])
    assert no_history.history == []


def _bad_inputs(good: xr.Dataset) -> dict[str, xr.Dataset]:
    nan_counts = good.copy(deep=True)
    nan_counts["counts"][3, 4] = np.nan
    inf_background = good.copy(deep=True)
    inf_background["background"][0, 0] = np.inf
    negative_background = good.copy(deep=True)
    negative_background["background"][2, 2] = -0.5
    negative_counts = good.copy(deep=True)
    negative_counts["counts"][2, 2] = -1.0
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["LINEAR", "LINEAR"]
    non_celestial = good.copy()
    non_celestial.attrs = {"wcs": dict(linear.to_header())}
    no_wcs = good.copy()
    no_wcs.attrs = {}
    return {
        "nan_counts": nan_counts,
        "inf_background": inf_background,
        "negative_background": negative_background,
        "negative_counts": negative_counts,
        "missing_counts": good.drop_vars("counts"),
        "missing_background": good.drop_vars("background"),
        "transposed": good.transpose("x", "y"),
        "renamed_dims": good.rename_dims({"y": "row"}),
        "extra_dim": good.expand_dims(band=2),
        "empty": good.isel(y=slice(0, 0)),
        "non_celestial_wcs": non_celestial,
        "no_wcs": no_wcs,
    }


@pytest.mark.parametrize(
    "case",
    [
        "nan_counts",
        "inf_background",
        "negative_background",
        "negative_counts",
        "missing_counts",
        "missing_background",
        "transposed",
        "renamed_dims",
        "extra_dim",
        "empty",
        "non_celestial_wcs",
        "no_wcs",
    ],
)
def test_bad_input_raises(case, random_maps):
    data = _bad_inputs(random_maps(0, (12, 14)))[case]
    with pytest.raises(InputError):
        CWT(CWTKernels(1, 1.0, 1.5)).analyze(data)


def test_not_a_dataset_raises(random_maps):
    with pytest.raises(InputError, match="Dataset"):
        CWT(CWTKernels(1, 1.0, 1.5)).analyze(random_maps(0, (12, 14))["counts"])


@pytest.mark.parametrize(
    "options",
    [
        {"max_iter": 0},
        {"max_iter": 2.5},
        {"max_iter": True},
        {"tol": -1e-3},
        {"tol": np.nan},
        {"significance_threshold": np.nan},
        {"significance_threshold": np.inf},
        {"significance_threshold": 0.0},
        {"significance_threshold": -1.0},
        {"significance_island_threshold": np.nan},
    ],
    ids=repr,
)
def test_bad_parameters_raise(options):
    with pytest.raises(InputError):
        CWT(CWTKernels(2, 1.0, 1.5), **options)


def test_bad_kernels_raise():
    with pytest.raises(InputError, match="CWTKernels"):
        CWT((2, 1.0, 1.5))


def test_wrap_lon_on_partial_map_raises(random_maps):
    with pytest.raises(InputError, match="360"):
        CWT(CWTKernels(1, 1.0, 1.5), wrap_lon=True).analyze(random_maps(0, (12, 14)))


# --- the tutorial's run on the real survey map ----------------------------------------------


@pytest.mark.slow
def test_tutorial_run_matches_brute_force(survey_cutout):
    """The original tutorial: 20 x 10 deg around the survey map centre, n_scale 2, min_scale 6,
    step_scale 1.3, threshold 2, tol 1e-5, max_iter 10, history kept."""
    assert survey_cutout.sizes == {"y": 100, "x": 200}
    assert float(survey_cutout["counts"].sum()) == 8889
    kernel_args = (2, 6.0, 1.3)
    options = {"significance_threshold": 2.0, "tol": 1e-5, "max_iter": 10}
    result, cwt, expected = run_both(survey_cutout, kernel_args, options)
    assert expected.state["support"].any()
    assert_run_matches(result, cwt, expected)
    assert result.attrs["iterations"] == 10 and not result.attrs["converged"]


# --- float32 engine --------------------------------------------------------------------------


def test_float32_engine_is_close_to_float64_in_memory_tiled_and_stored(tmp_path) -> None:
    data, _ = cwtflow.simulate_sky((96, 160), seed=5)
    kernels = CWTKernels(2, 2.0, 1.5)
    exact = CWT(kernels, max_iter=3, tol=0).analyze(data)
    fast = CWT(kernels, max_iter=3, tol=0, dtype="float32").analyze(data)
    tiled = CWT(kernels, max_iter=3, tol=0, dtype="float32").analyze(
        data, chunks=48, store=tmp_path / "run.zarr"
    )
    assert fast["model"].dtype == np.float32 and fast["transform_3d"].dtype == np.float32
    assert tiled["model"].dtype == np.float32
    assert fast.attrs["parameters"]["dtype"] == "float32"
    scale = float(abs(exact["model"]).max())
    for state in (fast, tiled):
        diff = abs(state["model"].values.astype(np.float64) - exact["model"].values).max()
        assert diff <= 1e-5 * scale
        flipped = int((state["support"].values != exact["support"].values).sum())
        assert flipped <= 1e-3 * exact["support"].size
    np.testing.assert_allclose(
        fast.attrs["residual_variance"], exact.attrs["residual_variance"], rtol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float16", "int32", "complex64", None])
def test_dtype_must_be_float64_or_float32(dtype) -> None:
    with pytest.raises(InputError, match="dtype must be"):
        CWT(CWTKernels(1, 1.0, 1.5), dtype=dtype)
