"""Derived images, metric tables and differences of states, checked against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from helpers import random_arrays

import cwtflow
from cwtflow import CWT, CWTKernels, analysis

IMAGE_ORDER = [
    "counts",
    "background",
    "model",
    "approx",
    "approx_bkg",
    "transform_2d",
    "model_plus_approx",
    "residual",
    "maximal",
    "support_2d",
]
CUBE_ORDER = ["transform_3d", "error", "support"]
COLUMNS = ["Name", "Shape", "Variance", "Mean", "Max value", "Min value", "Sum values"]


@pytest.fixture(scope="module")
def run() -> CWT:
    counts, background = random_arrays(21, (30, 44))
    cwt = CWT(CWTKernels(3, 1.0, 1.4), significance_threshold=2.0, max_iter=4, keep_history=True)
    cwt.analyze(cwtflow.make_maps(counts, background))
    assert cwt.history[-1]["support"].values.any()
    return cwt


@pytest.fixture(scope="module")
def state(run: CWT) -> xr.Dataset:
    return run.history[-1]


def _expected_images(state: xr.Dataset) -> dict[str, np.ndarray]:
    c, m, a = (state[k].values for k in ("counts", "model", "approx"))
    t, s = state["transform_3d"].values, state["support"].values
    support_2d = np.zeros(c.shape, dtype=bool)
    for i in range(s.shape[0]):
        support_2d |= s[i]
    maximal = np.max([t[i] * support_2d for i in range(t.shape[0])], axis=0)
    return {
        "model_plus_approx": m + a,
        "residual": c - (m + a),
        "support_2d": support_2d,
        "maximal": maximal,
    }


def test_derived_images(state):
    derived = cwtflow.derived_images(state)
    for name, expected in _expected_images(state).items():
        assert derived[name].dims == ("y", "x")
        np.testing.assert_array_equal(derived[name].values, expected, err_msg=name)
    assert derived["support_2d"].dtype == bool
    assert derived["residual"].attrs["units"] == "count"


def test_images_and_cubes_in_reference_order(state):
    imgs = cwtflow.images(state)
    assert list(imgs.data_vars) == IMAGE_ORDER
    for name in IMAGE_ORDER[:6]:
        np.testing.assert_array_equal(imgs[name].values, state[name].values)
    cubes = cwtflow.cubes(state)
    assert list(cubes.data_vars) == CUBE_ORDER
    assert all(cubes[name].dims == ("scale", "y", "x") for name in CUBE_ORDER)


def _row(table, name):
    (index,) = np.flatnonzero(table["Name"] == name)
    return table[index]


def _assert_metrics(row, values: np.ndarray, shape: str) -> None:
    values = np.asarray(values, dtype=np.float64)
    assert row["Shape"] == shape
    np.testing.assert_allclose(
        [row["Variance"], row["Mean"], row["Max value"], row["Min value"], row["Sum values"]],
        [np.var(values), np.mean(values), np.max(values), np.min(values), np.sum(values)],
        rtol=1e-12,
        atol=1e-14 * max(1.0, float(np.abs(values).max())),
    )


@pytest.mark.parametrize("name", IMAGE_ORDER)
def test_image_metrics(state, name):
    table = cwtflow.image_metrics(state, name)
    assert table.colnames == COLUMNS and len(table) == 1
    expected = _expected_images(state).get(name)
    values = state[name].values if expected is None else expected
    _assert_metrics(table[0], values, "2D image")
    assert table[0]["Name"] == name


@pytest.mark.parametrize("name", CUBE_ORDER)
def test_cube_metrics(state, name):
    whole = cwtflow.cube_metrics(state, name)
    assert whole.colnames == COLUMNS and len(whole) == 1
    _assert_metrics(whole[0], state[name].values, "3D cube")
    per_scale = cwtflow.cube_metrics(state, name, per_scale=True)
    assert per_scale.colnames == COLUMNS and len(per_scale) == state.sizes["scale"]
    for i, row in enumerate(per_scale):
        _assert_metrics(row, state[name].values[i], "2D image")
        assert f"{state['scale'].values[i]:g}" in row["Name"]


def test_state_metrics(state):
    table = cwtflow.state_metrics(state)
    assert table.colnames == COLUMNS
    assert list(table["Name"]) == IMAGE_ORDER + CUBE_ORDER
    assert list(table["Shape"]) == ["2D image"] * 10 + ["3D cube"] * 3
    expected = _expected_images(state)
    for name in IMAGE_ORDER:
        values = expected[name] if name in expected else state[name].values
        _assert_metrics(_row(table, name), values, "2D image")
    for name in CUBE_ORDER:
        _assert_metrics(_row(table, name), state[name].values, "3D cube")


def test_unknown_names_raise(state):
    with pytest.raises((KeyError, cwtflow.InputError)):
        cwtflow.image_metrics(state, "transform_3d")
    with pytest.raises((KeyError, cwtflow.InputError)):
        cwtflow.cube_metrics(state, "model")


def test_difference_semantics(run):
    later, earlier = run.history[3], run.history[1]
    diff = cwtflow.difference(later, earlier)
    for name in ("model", "approx", "approx_bkg", "transform_2d", "transform_3d", "error"):
        np.testing.assert_array_equal(
            diff[name].values, later[name].values - earlier[name].values, err_msg=name
        )
    np.testing.assert_array_equal(
        diff["support"].values, later["support"].values ^ earlier["support"].values
    )
    assert diff["support"].dtype == bool
    # XOR, not OR or AND: pixels in either support only
    other = earlier.copy()
    rng = np.random.default_rng(0)
    other["support"] = earlier["support"].copy(data=rng.random(earlier["support"].shape) > 0.5)
    xor = cwtflow.difference(later, other)["support"].values
    np.testing.assert_array_equal(xor, later["support"].values != other["support"].values)
    assert xor.any() and (later["support"].values & ~xor).any()
    # counts and background come from the first operand, not subtracted
    swapped = earlier.copy()
    swapped["counts"] = earlier["counts"] + 1.0
    swapped["background"] = earlier["background"] * 2.0
    reverse = cwtflow.difference(swapped, later)
    np.testing.assert_array_equal(reverse["counts"].values, swapped["counts"].values)
    np.testing.assert_array_equal(reverse["background"].values, swapped["background"].values)
    np.testing.assert_array_equal(
        reverse["support"].values, diff["support"].values
    )  # XOR is symmetric
    # later and earlier are left alone
    assert not np.shares_memory(diff["model"].values, later["model"].values)


def test_difference_with_itself(state):
    diff = cwtflow.difference(state, state)
    assert not diff["support"].values.any()
    for name in ("model", "approx", "transform_2d", "transform_3d", "error"):
        assert not diff[name].values.any()
    np.testing.assert_array_equal(diff["counts"].values, state["counts"].values)


def test_analyses_of_a_lazy_state_stay_lazy(state):
    lazy = state.chunk({"y": 16, "x": 20})
    imgs = analysis.images(lazy)
    assert imgs["residual"].chunks is not None
    xr.testing.assert_allclose(imgs.compute(), analysis.images(state), rtol=0, atol=1e-12)
    diff = analysis.difference(lazy, lazy)
    assert diff["model"].chunks is not None
    table = analysis.image_metrics(lazy, "residual")
    np.testing.assert_allclose(
        table[0]["Variance"], analysis.image_metrics(state, "residual")[0]["Variance"], rtol=1e-12
    )
