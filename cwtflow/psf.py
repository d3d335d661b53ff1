"""The instrument's point-spread function and the settings that follow from it (numpy/astropy).

A `PSF` is described by the sigma of a circular 2-D Gaussian (an angle). It can be given as that
sigma, as a 68 % containment radius, or as a radial profile table (its 68 % containment radius
is integrated from the table, then converted to the Gaussian's sigma; the catalog's point-source
template is that Gaussian). `psf_settings` applies the rule of ``docs/psf_rule.md`` — derived on
simulations over PSF sizes, background levels and source densities
(``benchmarks/psf_rule.py``) — to turn a PSF and a pixel size into the CWT kernels, the
catalog's minimum separation and the extension model.

Angles are astropy Quantities everywhere: `as_angle` refuses a bare number with a message that
says which unit to add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy import units as u

from .errors import ParameterError

__all__ = [
    "EXTENDED_TS",
    "LARGE_EXTENSION_PER_SIGMA",
    "MAX_EXTENSION_PER_SIGMA",
    "MIN_SCALE_PER_SIGMA",
    "MIN_SEPARATION_PER_SIGMA",
    "N_SCALE",
    "PSF",
    "R68_PER_SIGMA",
    "R95_PER_SIGMA",
    "STEP_SCALE",
    "as_angle",
    "as_psf",
    "psf_settings",
]

#: 68 % and 95 % containment radii of a circular 2-D Gaussian, in units of its sigma:
#: ``sqrt(-2 ln(1 - p))``.
R68_PER_SIGMA = math.sqrt(-2.0 * math.log(1.0 - 0.6827))
R95_PER_SIGMA = math.sqrt(-2.0 * math.log(1.0 - 0.95))

# --- the rule (docs/psf_rule.md) ------------------------------------------------------------
#: Smallest wavelet scale / PSF sigma (the smallest wavelet's width is ``step_scale`` times it).
MIN_SCALE_PER_SIGMA = 0.75
#: Ratio between successive scales.
STEP_SCALE = 2.0
#: Number of scales: widths 2 and 4 PSF sigmas (point sources and sources up to ~2 sigma).
N_SCALE = 2
#: Catalog peaks closer than this many PSF sigmas are one source.
MIN_SEPARATION_PER_SIGMA = 2.0
#: Largest intrinsic Gaussian extension the catalog fits, in PSF sigmas.
MAX_EXTENSION_PER_SIGMA = 2.0
#: Largest extension, in PSF sigmas, of a source tried in place of the components of a source
#: larger than the extension model (`cwtflow.merge`).
LARGE_EXTENSION_PER_SIGMA = 8.0
#: A source is flagged extended when ``TS_ext = 2 (log L_ext - log L_point)`` reaches this.
EXTENDED_TS = 16.0


def as_angle(value: Any, name: str, *, example: str = "0.15 * u.deg") -> u.Quantity:
    """``value`` as an angle Quantity (scalar), or `InputError` naming ``name``.

    A bare number is refused (``"{name}: give an angle, e.g. {example}"``); so are other units,
    non-finite and non-positive values. Strings such as ``"0.15deg"`` are read by
    `astropy.units.Quantity`.
    """
    if isinstance(value, str):
        try:
            value = u.Quantity(value)
        except (TypeError, ValueError):
            raise ParameterError(
                f"{name}: cannot read {value!r} as an angle, e.g. 0.15deg"
            ) from None
    if not isinstance(value, u.Quantity) or value.unit == u.dimensionless_unscaled:
        raise ParameterError(f"{name}: give an angle, e.g. {example} (got {value!r})")
    if not value.unit.is_equivalent(u.deg):
        raise ParameterError(f"{name}: give an angle, e.g. {example} (got a unit of {value.unit})")
    if value.ndim != 0:
        raise ParameterError(f"{name}: give one angle, got shape {value.shape}")
    if not (np.isfinite(value.value) and value.value > 0):
        raise ParameterError(f"{name}: must be a positive finite angle, got {value!r}")
    return value.to(u.deg)


@dataclass(frozen=True)
class PSF:
    """A circular Gaussian point-spread function.

    Build it with `PSF.gaussian` (its sigma), `PSF.from_r68` (68 % containment radius) or
    `PSF.from_profile` (a radial profile table); `as_psf` accepts any of those or a bare angle
    Quantity (a sigma).

    Attributes
    ----------
    sigma : astropy Quantity
        Gaussian sigma (deg).
    """

    sigma: u.Quantity

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", as_angle(self.sigma, "psf"))

    @classmethod
    def gaussian(cls, sigma: Any) -> PSF:
        """A Gaussian PSF of this sigma (an angle)."""
        return cls(as_angle(sigma, "psf sigma"))

    @classmethod
    def from_r68(cls, r68: Any) -> PSF:
        """The Gaussian PSF whose 68 % containment radius is ``r68`` (an angle)."""
        return cls(as_angle(r68, "psf r68", example="0.23 * u.deg") / R68_PER_SIGMA)

    @classmethod
    def from_profile(cls, radius: Any, profile: Any) -> PSF:
        """The Gaussian PSF with the 68 % containment radius of a radial profile table.

        Parameters
        ----------
        radius : astropy Quantity, shape (n,)
            Increasing radii (angles) from 0 out to where the profile is negligible.
        profile : array-like, shape (n,)
            Surface brightness at those radii (any normalisation, >= 0).
        """
        if not isinstance(radius, u.Quantity) or not radius.unit.is_equivalent(u.deg):
            raise ParameterError(
                "psf profile radius: give angles, e.g. np.linspace(0, 1, 50) * u.deg"
            )
        r = radius.to_value(u.deg).astype(np.float64)
        p = np.asarray(profile, dtype=np.float64)
        if r.ndim != 1 or r.shape != p.shape or r.size < 3:
            raise ParameterError(
                "psf profile: radius and profile must be 1-D of the same length >= 3"
            )
        if not (np.all(np.isfinite(r)) and np.all(np.diff(r) > 0) and r[0] >= 0):
            raise ParameterError("psf profile: radii must be finite, >= 0 and increasing")
        if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
            raise ParameterError("psf profile: values must be finite, >= 0 and not all 0")
        # containment: integral of 2 pi r p(r) dr (trapezoids)
        ring = 2 * np.pi * r * p
        cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (ring[1:] + ring[:-1]) * np.diff(r))])
        cumulative /= cumulative[-1]
        r68 = float(np.interp(0.6827, cumulative, r))
        return cls.from_r68(r68 * u.deg)

    @property
    def r68(self) -> u.Quantity:
        """68 % containment radius."""
        return self.sigma * R68_PER_SIGMA

    def sigma_pixels(self, pixel_size: Any) -> float:
        """Sigma in pixels of ``pixel_size`` (an angle)."""
        size = as_angle(pixel_size, "pixel_size", example="0.1 * u.deg")
        # rounded so that 0.15 deg / 0.1 deg is 1.5 px, not 1.4999999999999998
        return round(float((self.sigma / size).decompose()), 9)


def as_psf(psf: Any) -> PSF:
    """``psf`` as a `PSF`: a `PSF`, or an angle taken as the Gaussian sigma (a Quantity or a
    string such as ``"0.15deg"``)."""
    if isinstance(psf, PSF):
        return psf
    return PSF(as_angle(psf, "psf"))


def psf_settings(psf: Any, pixel_size: Any) -> dict[str, float | int]:
    """Settings that follow from the PSF (the rule of ``docs/psf_rule.md``).

    Returns
    -------
    dict
        ``n_scale``, ``min_scale``, ``step_scale`` (the kernels, pixels), ``psf_sigma`` (pixels),
        ``psf_sigma_deg``, ``min_separation`` (pixels), ``max_extension`` (pixels).
    """
    psf = as_psf(psf)
    sigma = psf.sigma_pixels(pixel_size)
    return {
        "n_scale": N_SCALE,
        "min_scale": MIN_SCALE_PER_SIGMA * sigma,
        "step_scale": STEP_SCALE,
        "psf_sigma": sigma,
        "psf_sigma_deg": float(psf.sigma.to_value(u.deg)),
        "min_separation": MIN_SEPARATION_PER_SIGMA * sigma,
        "max_extension": MAX_EXTENSION_PER_SIGMA * sigma,
    }
