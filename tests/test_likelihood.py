"""The Poisson likelihood fit on cut-outs (`cwtflow.likelihood`), the neighbour sweeps
(`cwtflow.refine`) and the PSF description and rule (`cwtflow.psf`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy import units as u

from cwtflow import likelihood, psf
from cwtflow.errors import InputError
from cwtflow.refine import Windows, refine

SIGMA = 1.5


def ensemble(n, *, seed=0, size=31, background=0.5, counts=(20.0, 200.0), extension=0.0):
    """``n`` windows of one Gaussian source each (pixel-integrated), with the truth."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(*counts, n)
    x = size // 2 + rng.uniform(-0.5, 0.5, n)
    y = size // 2 + rng.uniform(-0.5, 0.5, n)
    base = np.full((n, size, size), background)
    sigma = np.full(n, math.hypot(SIGMA, extension))
    mu = base + likelihood.source_images(a, x, y, sigma, (size, size))
    return rng.poisson(mu).astype(float), base, a, x, y


def test_profiles_integrate_to_one_and_their_derivatives_are_right():
    centre, sigma = np.array([7.3, 7.0]), np.array([1.5, 2.2])
    g, dg_dc, dg_ds = likelihood.gaussian_profiles(centre, sigma, 15)
    np.testing.assert_allclose(g.sum(axis=1), 1.0, atol=1e-3)
    h = 1e-6
    g_c, _, _ = likelihood.gaussian_profiles(centre + h, sigma, 15)
    g_s, _, _ = likelihood.gaussian_profiles(centre, sigma + h, 15)
    np.testing.assert_allclose(dg_dc, (g_c - g) / h, atol=1e-5)
    np.testing.assert_allclose(dg_ds, (g_s - g) / h, atol=1e-5)


def test_the_fit_recovers_a_bright_point_source_within_its_errors():
    counts, base, a, x, y = ensemble(1, seed=4, counts=(300.0, 300.0))
    start = np.array([[100.0, 15.0, 15.0]])
    fit = likelihood.fit_sources(
        counts, base, np.ones_like(counts, bool), start, SIGMA, max_shift=3
    )
    assert fit.converged[0]
    err = np.sqrt(np.diag(fit.cov[0]))
    for value, truth, e in zip(fit.params[0], (a[0], x[0], y[0]), err, strict=True):
        assert abs(value - truth) < 3 * e
    # the no-background limit of the position error: sigma / sqrt(counts)
    assert err[1] == pytest.approx(SIGMA / math.sqrt(300), rel=0.3)
    assert fit.ts[0] > 100


def test_pulls_are_calibrated_on_an_ensemble_of_200_sources():
    counts, base, a, x, y = ensemble(200, seed=1)
    start = np.column_stack([0.7 * a, np.full(200, 15.0), np.full(200, 15.0)])
    fit = likelihood.fit_sources(
        counts, base, np.ones_like(counts, bool), start, SIGMA, max_shift=3
    )
    err = np.sqrt(np.einsum("kpp->kp", fit.cov))
    for j, truth in enumerate((a, x, y)):
        pull = (fit.params[:, j] - truth) / err[:, j]
        assert 0.55 <= np.median(np.abs(pull)) <= 0.8, j
        assert 0.85 <= np.sqrt(np.mean(pull**2)) <= 1.2, j


@pytest.mark.slow
def test_extension_is_recovered_within_errors():
    counts, base, a, _, _ = ensemble(150, seed=2, counts=(200.0, 500.0), extension=2.0)
    start = np.column_stack([a, np.full(150, 15.0), np.full(150, 15.0), np.full(150, 1.0)])
    fit = likelihood.fit_sources(
        counts,
        base,
        np.ones_like(counts, bool),
        start,
        SIGMA,
        extended=True,
        max_shift=3,
        max_extension=6,
    )
    v, v_err = fit.params[:, 3], np.sqrt(fit.cov[:, 3, 3])
    assert np.median(np.sqrt(v)) == pytest.approx(2.0, rel=0.1)
    assert np.mean(np.abs(v - 4.0) <= 2 * v_err) > 0.85


def test_refine_fits_two_blended_sources_and_drops_a_duplicate_seed():
    size, shape = 41, (41, 80)
    rng = np.random.default_rng(3)
    truth = [(200.0, 30.0, 20.0), (150.0, 36.0, 21.0)]
    sky = np.full(shape, 0.4)
    for a, x, y in truth:
        sky += likelihood.source_images(
            np.array([a]), np.array([x]), np.array([y]), np.array([SIGMA]), shape
        )[0]
    counts = rng.poisson(sky).astype(float)
    seeds = np.array([[100.0, 30.4, 20.2], [100.0, 35.6, 21.3], [50.0, 30.1, 19.7]])
    half = size // 2
    wins = []
    for _, x, y in seeds:
        y0, x0 = round(y) - half, round(x) - half
        c = np.zeros((size, size))
        valid = np.zeros((size, size), bool)
        ys, xs = slice(max(0, y0), min(shape[0], y0 + size)), slice(max(0, x0), x0 + size)
        c[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = counts[ys, xs]
        valid[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = True
        wins.append((c, np.full((size, size), 0.4) * valid, valid, (y0, x0)))
    windows = Windows(
        counts=np.stack([w[0] for w in wins]),
        background=np.stack([w[1] for w in wins]),
        exposure=None,
        valid=np.stack([w[2] for w in wins]),
        origin=np.array([w[3] for w in wins], dtype=float),
    )
    out = refine(windows, seeds, SIGMA, min_separation=3.0, max_extension=3.0)
    assert out.keep.sum() == 2
    for a, x, y in truth:
        d = np.hypot(out.x - x, out.y - y) + np.where(out.keep, 0, 1e9)
        i = int(np.argmin(d))
        assert d[i] < 4 * max(out.x_err[i], out.y_err[i])
        assert abs(out.counts[i] - a) < 4 * out.counts_err[i]
    assert not out.extended[out.keep].any()


def test_angles_are_quantities():
    assert psf.as_angle("0.15deg", "psf") == 0.15 * u.deg
    assert psf.as_angle(9 * u.arcmin, "psf").to_value(u.deg) == pytest.approx(0.15)
    with pytest.raises(InputError, match=r"psf: give an angle, e\.g\. 0\.15 \* u\.deg"):
        psf.as_angle(0.15, "psf")
    with pytest.raises(InputError, match="give an angle"):
        psf.as_angle(1 * u.m, "psf")
    with pytest.raises(InputError, match="positive"):
        psf.as_angle(0 * u.deg, "psf")
    with pytest.raises(InputError, match="give one angle"):
        psf.as_angle([1, 2] * u.deg, "psf")


def test_psf_from_sigma_r68_profile_and_the_rule():
    gauss = psf.PSF.gaussian(0.15 * u.deg)
    # a circular 2-D Gaussian holds 1 - exp(-r^2 / (2 sigma^2)) within r
    r68 = gauss.r68.to_value(u.deg)
    assert 1 - math.exp(-(r68**2) / (2 * 0.15**2)) == pytest.approx(0.6827, abs=1e-4)
    assert psf.R95_PER_SIGMA == pytest.approx(math.sqrt(-2 * math.log(0.05)))
    assert psf.PSF.from_r68(gauss.r68).sigma.to_value(u.deg) == pytest.approx(0.15)
    assert psf.as_psf("0.15deg") == gauss
    settings = psf.psf_settings(0.15 * u.deg, 0.1 * u.deg)
    assert settings["psf_sigma"] == 1.5
    assert settings["min_scale"] == psf.MIN_SCALE_PER_SIGMA * 1.5
    assert settings["min_separation"] == psf.MIN_SEPARATION_PER_SIGMA * 1.5
    with pytest.raises(InputError, match="psf profile"):
        psf.PSF.from_profile([0, 1, 2], [1, 0.5, 0])
    with pytest.raises(InputError, match="increasing"):
        psf.PSF.from_profile([0, 2, 1] * u.deg, [1, 0.5, 0])
