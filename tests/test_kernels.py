"""Kernel check values of the specification."""

import numpy as np
import pytest
from astropy.convolution import RickerWavelet2DKernel

from cwtflow import CWTKernels, InputError


def test_check_values_min_scale_3():
    k = CWTKernels(n_scale=2, min_scale=3.0, step_scale=2.6)
    np.testing.assert_allclose(k.scales, [3.0, 7.8], rtol=1e-15)
    np.testing.assert_allclose(k.approx.sum(), 0.99988318386, rtol=1e-11)
    np.testing.assert_allclose(k.approx.max(), 0.000386976177431, rtol=1e-12)
    np.testing.assert_allclose(k.wavelets[0].sum(), 3.01663209714e-05, rtol=1e-11)
    np.testing.assert_allclose(k.wavelets[0].max(), 8.59947060958e-05, rtol=1e-11)
    np.testing.assert_allclose(k.wavelets[1].sum(), 4.84548284275e-06, rtol=1e-11)
    np.testing.assert_allclose(k.wavelets[1].max(), 1.88182106053e-06, rtol=1e-11)


def test_tutorial_widths_and_halo():
    k = CWTKernels(n_scale=2, min_scale=6.0, step_scale=1.3)
    assert [w.shape[0] for w in k.wavelets] == [63, 83]
    assert k.approx.shape == (83, 83)
    assert k.halo == 41
    assert len(k.info_table()) == 7 + 3 * 2
    assert k.info_table().colnames == ["Name", "Source"]


def test_wavelet_equals_astropy_ricker():
    k = CWTKernels(n_scale=3, min_scale=2.0, step_scale=1.5)
    for scale, kernel in zip(k.scales, k.wavelets, strict=True):
        expected = RickerWavelet2DKernel(scale * k.step_scale).array
        assert kernel.shape == expected.shape
        np.testing.assert_allclose(kernel, expected, rtol=0, atol=1e-15 * np.abs(expected).max())


def test_kernels_are_read_only():
    k = CWTKernels(1, 2.0, 1.5)
    with pytest.raises(ValueError):
        k.wavelets[0][0, 0] = 1.0


@pytest.mark.parametrize(
    "args", [(0, 1.0, 1.5), (2, -1.0, 1.5), (2, 1.0, 1.0), (1.5, 1.0, 2.0), (2, np.nan, 2.0)]
)
def test_bad_parameters(args):
    with pytest.raises(InputError):
        CWTKernels(*args)


@pytest.mark.parametrize(
    "kernels", [CWTKernels(1, 1.0, 1.5), CWTKernels(3, 0.8, 1.4), CWTKernels(2, 1.0, 2.0)]
)
def test_halo_is_half_the_largest_kernel(kernels: CWTKernels) -> None:
    largest = max(k.shape[0] for k in (*kernels.wavelets, kernels.approx))
    assert kernels.halo == largest // 2 and kernels.size == largest


def test_from_dict_inverts_to_dict() -> None:
    kernels = CWTKernels(3, 0.8, 1.4)
    assert CWTKernels.from_dict({**kernels.to_dict(), "max_iter": 4}) == kernels
    with pytest.raises(InputError, match="step_scale"):
        CWTKernels.from_dict({"n_scale": 2, "min_scale": 1.0})
