"""`cwtflow.background_error`: the background model's error measured on known skies."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest

from cwtflow.background_error import MIN_BLOCKS, measured_background_error

HALF = 5
SIDE = 2 * HALF + 1


def sky(tau: float, seed: int, blocks: int = 60, level: float = 4.0):
    """Poisson counts of a flat background, and a model off by a relative ``tau`` (rms)
    constant on each block of the measurement."""
    rng = np.random.default_rng(seed)
    truth = np.full((blocks * SIDE, blocks * SIDE), level)
    factor = np.clip(1 + tau * rng.standard_normal((blocks, blocks)), 0.1, None)
    model = truth / np.kron(factor, np.ones((SIDE, SIDE)))
    return rng.poisson(truth).astype(float), model


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.2])
def test_recovers_the_model_error(tau: float) -> None:
    found = [measured_background_error(*sky(tau, seed), np.zeros((0, 2)), HALF) for seed in (1, 2)]
    for value, n in found:
        assert n == 3600
        # the model is off by 1/factor: relative rms ~ tau (1 + 3 tau^2) to second order
        expected = tau * (1 + 3 * tau**2)
        assert value == pytest.approx(expected, abs=0.015)


def test_candidates_windows_are_left_out_and_dask_gives_the_same() -> None:
    counts, model = sky(0.0, 3, blocks=30)
    rng = np.random.default_rng(4)
    centres = rng.uniform(20, 30 * SIDE - 20, (40, 2))
    for y, x in centres:  # bright sources the model does not hold
        counts[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] += 30
    dirty, _ = measured_background_error(counts, model, np.zeros((0, 2)), HALF)
    clean, n = measured_background_error(counts, model, centres, HALF)
    assert dirty > 0.05 and clean < 0.02 and 900 - 4 * 40 <= n <= 900 - 40
    lazy = measured_background_error(
        da.from_array(counts, chunks=100), da.from_array(model, chunks=70), centres, HALF
    )
    assert lazy == pytest.approx((clean, n), rel=1e-12)


def test_too_few_free_blocks_measure_nothing() -> None:
    counts, model = sky(0.0, 5, blocks=4)
    value, n = measured_background_error(counts, model, np.zeros((0, 2)), HALF)
    assert n == 16 < MIN_BLOCKS and value == math.inf
