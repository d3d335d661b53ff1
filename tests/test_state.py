"""The state Dataset: optional inputs (exposure) carried through every path."""

import numpy as np
import pytest

import cwtflow
from cwtflow.state import STATE_VARS


@pytest.fixture
def maps():
    rng = np.random.default_rng(3)
    background = rng.uniform(0.5, 1.5, (24, 32))
    counts = rng.poisson(background).astype(float)
    counts[10:13, 14:17] += 12
    exposure = rng.uniform(1e10, 2e10, (24, 32))
    return cwtflow.make_maps(counts, background, exposure=exposure)


def _run(maps, **kwargs):
    cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 1.0, 1.5), max_iter=3, keep_history=True)
    return cwt, cwt.analyze(maps, **kwargs)


@pytest.mark.parametrize("chunks", [None, 12])
def test_exposure_is_carried_unchanged(maps, chunks, tmp_path):
    cwt, result = _run(maps, chunks=chunks)
    assert set(STATE_VARS) <= set(result.data_vars)
    np.testing.assert_array_equal(result["exposure"].values, maps["exposure"].values)
    assert all("exposure" in state for state in cwt.history)
    assert result["exposure"].attrs["units"] == "cm2 s"


def test_exposure_survives_fits_and_store(maps, tmp_path):
    _, result = _run(maps)
    back = cwtflow.read_state(cwtflow.write_state(result, tmp_path / "r.fits"))
    np.testing.assert_array_equal(back["exposure"].values, maps["exposure"].values)
    _, stored = _run(maps, store=tmp_path / "run.zarr")
    final = cwtflow.read_result(tmp_path / "run.zarr")
    np.testing.assert_array_equal(final["exposure"].values, maps["exposure"].values)
    np.testing.assert_array_equal(stored["exposure"].values, maps["exposure"].values)


def test_state_without_exposure_has_none(maps):
    _, result = _run(maps.drop_vars("exposure"))
    assert "exposure" not in result
