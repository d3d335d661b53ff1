"""The numeric core against scipy and against the brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as ref
from helpers import clean_whole_map
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.signal import fftconvolve

from cwtflow import CWTKernels, core

SMALL = CWTKernels(2, 1.0, 1.5)  # sides 13, 19; approx 19; halo 9
WIDE = CWTKernels(1, 2.0, 1.5)  # wavelet side 25, approx side 25; halo 12
# many shapes, several smaller than the kernels on one or both axes
SHAPES = [(1, 1), (1, 6), (2, 3), (4, 19), (7, 7), (9, 30), (19, 19), (20, 3), (26, 25), (33, 40)]


def _images(shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    background = rng.uniform(0.2, 2.0, shape)
    return {
        "counts": rng.poisson(background + 3 * rng.random(shape)).astype(np.float64),
        "background": background,
        "model": rng.uniform(0.0, 1.0, shape),
        "approx": rng.normal(0.0, 0.3, shape),
    }


def _same(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return fftconvolve(image, kernel, mode="same")


def _same_wrap_x(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    half = kernel.shape[1] // 2
    padded = np.pad(image, ((0, 0), (half, half)), mode="wrap")
    return fftconvolve(padded, kernel, mode="same")[:, half : half + image.shape[1]]


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-11) -> None:
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("kernels", [SMALL, WIDE], ids=["small", "wide"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("periodic", [False, True], ids=["zero", "wrap_x"])
def test_convolve_step_matches_scipy(shape, kernels, periodic):
    im = _images(shape, sum(shape))
    conv = _same_wrap_x if periodic else _same
    grid = core.fft_shape(shape, kernels.halo, periodic=(False, periodic))
    spectra = core.kernel_spectra(kernels, grid)
    total = im["model"] + im["background"] + im["approx"]
    excess = im["counts"] - total
    cmb = im["counts"] - im["model"] - im["background"]
    const = core.image_spectra(im["counts"], im["background"], shape=grid)
    for const_spectra in (None, const):
        transform, error_sq, approx = core.convolve_step(
            im["counts"], im["background"], im["model"], im["approx"], spectra,
            const_spectra=const_spectra,
        )  # fmt: skip
        assert transform.shape == error_sq.shape == (kernels.n_scale, *shape)
        for i, kernel in enumerate(kernels.wavelets):
            _assert_close(transform[i], conv(excess, kernel))
            _assert_close(error_sq[i], conv(total, kernel**2))
        _assert_close(approx, conv(cmb, kernels.approx))
    _assert_close(
        core.convolve_approx(im["background"], spectra), conv(im["background"], kernels.approx)
    )


@pytest.mark.parametrize("shape", [(1, 1), (7, 30), (33, 40)], ids=str)
def test_convolve_step_threaded_equals_single(shape):
    """``workers > 1`` takes scipy.fft's threaded path; one worker numpy's: same numbers."""
    im = _images(shape, 8)
    grid = core.fft_shape(shape, SMALL.halo)
    spectra = core.kernel_spectra(SMALL, grid)
    const = core.image_spectra(im["counts"], im["background"], shape=grid, workers=2)
    np.testing.assert_allclose(
        const, core.image_spectra(im["counts"], im["background"], shape=grid), atol=1e-12
    )
    args = (im["counts"], im["background"], im["model"], im["approx"], spectra)
    for const_spectra in (None, const):
        one = core.convolve_step(*args, const_spectra=const_spectra)
        two = core.convolve_step(*args, const_spectra=const_spectra, workers=2)
        for a, b in zip(one, two, strict=True):
            _assert_close(b, a, rtol=1e-13)


@pytest.mark.parametrize("shape", [(5, 3), (12, 7), (9, 30)], ids=str)
def test_periodic_convolution_matches_explicit_wrap_padding(shape):
    """Periodic longitude against np.pad(mode="wrap") + direct summation, kernels wider than the
    periodic axis included (they fold onto it several times)."""
    im = _images(shape, 3)
    grid = core.fft_shape(shape, WIDE.halo, periodic=(False, True))
    assert grid[1] == shape[1]
    spectra = core.kernel_spectra(WIDE, grid)
    transform, error_sq, approx = core.convolve_step(
        im["counts"], im["background"], im["model"], im["approx"], spectra
    )
    total = im["model"] + im["background"] + im["approx"]
    _assert_close(transform[0], ref.conv_wrap_x(im["counts"] - total, WIDE.wavelets[0]))
    _assert_close(error_sq[0], ref.conv_wrap_x(total, WIDE.wavelets[0] ** 2))
    _assert_close(
        approx, ref.conv_wrap_x(im["counts"] - im["model"] - im["background"], WIDE.approx)
    )


def test_fft_shape():
    for n, halo in itertools.product([1, 5, 40, 101, 2001], [0, 9, 41]):
        grid = core.fft_shape((n, n + 3), halo)
        assert grid[0] >= max(n + halo, 2 * halo + 1)
        assert grid[1] >= max(n + 3 + halo, 2 * halo + 1)
        assert core.fft_shape((n, n + 3), halo, periodic=(False, True))[1] == n + 3
        assert core.fft_shape((n, n + 3), halo, periodic=(True, False))[0] == n


def test_kernel_spectra_cached_and_read_only():
    a = core.kernel_spectra(SMALL, (30, 40))
    assert core.kernel_spectra(SMALL, (30, 40)) is a
    assert a.wavelet.shape == a.wavelet_sq.shape == (2, 30, 21)
    assert a.approx.shape == (30, 21)
    with pytest.raises(ValueError):
        a.wavelet[0, 0, 0] = 0


def test_image_spectra_is_zero_padded_rfft2():
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 7)), rng.random((5, 7))
    spec = core.image_spectra(x, y, shape=(16, 12))
    padded = np.zeros((16, 12))
    padded[:5, :7] = y
    np.testing.assert_allclose(spec[1], np.fft.rfft2(padded), atol=1e-13)


def test_significance_never_nan_or_inf():
    transform = np.array([[0.0, 1.0, -1.0, 5.0, 1e6, 0.0, 2.0, -3.0]])
    error_sq = np.array([[0.0, 0.0, 0.0, -1e-18, 5e-324, 4.0, 1e-300, 9.0]])
    error, sig = core.significance(transform, error_sq)
    assert np.isfinite(error).all() and np.isfinite(sig).all()
    np.testing.assert_array_equal(error[0, :4], 0.0)
    np.testing.assert_array_equal(sig[0, :4], 0.0)
    assert sig[0, 4] > 1e100
    np.testing.assert_allclose(sig[0, 5:], [0.0, 2.0 / 1e-150, -1.0])
    np.testing.assert_allclose(error[0, 5:], [2.0, 1e-150, 3.0])


def test_significance_matches_reference():
    rng = np.random.default_rng(4)
    transform = rng.normal(size=(2, 9, 11))
    error_sq = rng.normal(0.5, 1.0, size=(2, 9, 11))
    error_sq[0, :3] = 0.0
    error, sig = core.significance(transform, error_sq)
    expected_error, expected_sig = ref.significance(transform, error_sq)
    np.testing.assert_allclose(error, expected_error, rtol=1e-15)
    np.testing.assert_allclose(sig, expected_sig, rtol=1e-15)


def _random_significance(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """Smoothed noise: components of every size, single pixels included."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=shape)
    return 0.6 * ndimage.uniform_filter(noise, 2, mode="constant") * 3 + 0.5 * noise


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("wrap_x", [False, True])
def test_clean_support_matches_per_component_loop(seed, wrap_x):
    shape = [(1, 9), (9, 1), (6, 6), (25, 31), (40, 17)][seed % 5]
    sig = _random_significance(seed, shape)
    for remove_isolated, island in itertools.product([True, False], [None, 1.0, 2.2]):
        actual = clean_whole_map(
            sig, 0.8, remove_isolated=remove_isolated, island_threshold=island, wrap_x=wrap_x
        )
        expected = ref.clean(
            sig, 0.8, remove_isolated=remove_isolated, island_threshold=island, wrap_x=wrap_x
        )
        assert actual.dtype == bool
        np.testing.assert_array_equal(actual, expected)


def test_clean_support_hand_made():
    sig = np.zeros((6, 8))
    sig[0, 0] = 5.0  # isolated
    sig[2, 2] = sig[3, 3] = 5.0  # diagonal neighbours: two isolated pixels (4-connectivity)
    sig[5, 5:8] = [2.0, 2.5, 2.0]  # weak island of 3
    sig[1, 6:8] = [4.0, 6.0]  # strong island of 2 ending on the right edge
    sig[1, 0] = 4.0  # below (0, 0): together a component of 2
    kept = clean_whole_map(sig, 1.0, remove_isolated=True, island_threshold=3.0)
    expected = np.zeros_like(kept)
    expected[0, 0] = expected[1, 0] = True  # 2 pixels reaching 5
    expected[1, 6:8] = True
    np.testing.assert_array_equal(kept, expected)
    # across the seam (1, 7) touches (1, 0): one component with (0, 0)
    wrapped = clean_whole_map(sig, 1.0, remove_isolated=True, island_threshold=3.0, wrap_x=True)
    np.testing.assert_array_equal(wrapped, expected)
    sig[1, 0] = 0.0  # (0, 0) is now alone on the left
    assert not clean_whole_map(sig, 1.0, remove_isolated=True, island_threshold=None)[0, 0]
    sig[0, 7] = 1.5  # (0, 7) touches (0, 0) across the seam, and (1, 7)
    assert clean_whole_map(sig, 1.0, remove_isolated=True, island_threshold=None, wrap_x=True)[0, 0]


def test_component_keep():
    sizes = np.array([50, 1, 2, 1, 7])
    maxima = np.array([-np.inf, 9.0, 2.0, 1.0, 3.0])
    np.testing.assert_array_equal(
        core.component_keep(sizes, maxima, core.Cleaning(0.0, True, None)),
        [False, False, True, False, True],
    )
    np.testing.assert_array_equal(
        core.component_keep(sizes, maxima, core.Cleaning(0.0, False, 3.0)),
        [False, True, False, False, True],
    )
    np.testing.assert_array_equal(
        core.component_keep(sizes, maxima, core.Cleaning(0.0, True, 2.0)),
        [False, False, True, False, True],
    )


def test_update_model():
    rng = np.random.default_rng(2)
    model = rng.random((5, 6))
    transform = rng.normal(size=(3, 5, 6))
    support = rng.random((3, 5, 6)) > 0.5
    transform_2d, new_model = core.update_model(model, support, transform)
    expected = np.zeros((5, 6))
    for i in range(3):
        expected += support[i] * transform[i]
    np.testing.assert_allclose(transform_2d, expected, rtol=1e-14)
    np.testing.assert_allclose(new_model, model + np.maximum(expected, 0), rtol=1e-14)
    assert not np.shares_memory(new_model, model)


# --- convergence statistics ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    cuts=st.tuples(st.integers(1, 29), st.integers(1, 29)),
    seed=st.integers(0, 2**16),
)
def test_moments_of_tiles_combine_to_the_variance_of_the_map(shape, cuts, seed) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, shape).astype(float)
    model, approx = rng.uniform(0, 2, shape), rng.uniform(0, 2, shape)
    support = rng.random((2, *shape)) < 0.2
    ys = sorted({0, min(cuts[0], shape[0]), shape[0]})
    xs = sorted({0, min(cuts[1], shape[1]), shape[1]})
    tiles = [
        core.residual_moments(
            counts[y0:y1, x0:x1],
            model[y0:y1, x0:x1],
            approx[y0:y1, x0:x1],
            support[:, y0:y1, x0:x1],
        )
        for y0, y1 in itertools.pairwise(ys)
        for x0, x1 in itertools.pairwise(xs)
    ]
    variance, size = core.combine_moments(np.array(tiles))
    expected = np.var(counts - (model + approx))
    assert variance == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert size == np.count_nonzero(support.any(axis=0))
    whole = core.combine_moments(core.residual_moments(counts, model, approx, support))
    assert whole[0] == pytest.approx(expected, rel=1e-14, abs=1e-15)
