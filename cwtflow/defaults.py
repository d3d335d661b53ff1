"""Default settings of the public API, in a module that imports nothing.

`cwtflow.CWT` takes its keyword defaults from `CWT_DEFAULTS` and the command line shows and
uses the same values without importing the engine (so that ``cwtflow --help`` starts fast).
`CATALOG_DEFAULTS` mirrors `cwtflow.find_sources`'s defaults; a test checks the two agree.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CATALOG_DEFAULTS", "CWT_DEFAULTS", "KERNEL_DEFAULTS", "MAX_N_SCALE", "MIN_SCALE"]

#: Keyword defaults of `cwtflow.CWT` (its signature reads them from here).
CWT_DEFAULTS: dict[str, Any] = {
    "max_iter": 10,
    "tol": 1e-5,
    "significance_threshold": 3.0,
    "significance_island_threshold": None,
    "remove_isolated": True,
    "keep_history": False,
    "wrap_lon": None,
    "fft_workers": 1,
    "dtype": "float64",
}

#: Keyword defaults of `cwtflow.find_sources` that the command line exposes.
CATALOG_DEFAULTS: dict[str, Any] = {
    "min_significance": 5.0,
    "deblend": True,
    "contrast": 0.2,
    "min_separation": None,
    "fit_extension": True,
    "fit_background": False,
}

#: Kernel defaults of the command line: the CWT tutorial's (`CWTKernels` itself has none).
KERNEL_DEFAULTS: dict[str, Any] = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}

#: Smallest ``min_scale`` (pixels). The smallest kernel then has width >= 0.5 px (wavelet of
#: width ``min_scale * step_scale``, Gaussian of sigma ``min_scale * step_scale**n_scale``):
#: by Poisson summation a Gaussian of sigma s sampled at pixel centres sums to its integral
#: (1) within about ``4 * exp(-2 * pi**2 * s**2)``: 1.029 at s = 0.5 (a 5 x 5 kernel), but
#: 2.55 at s = 0.25 (3 x 3), where that series no longer converges fast; and a Ricker
#: wavelet keeps its negative ring on the first ring of pixels only while its zero crossing
#: ``sqrt(2) * w`` stays below ~1 px. Below the floor the kernel collapses to a few pixels of
#: values up to ``1 / (pi w**4)`` (1e35 at w = 1e-9) and the transform is meaningless.
MIN_SCALE = 0.5
#: Largest number of scales: the state holds three (n_scale, ny, nx) cubes and every iteration
#: convolves 2 * n_scale + 1 times; 100 scales from MIN_SCALE to the largest width already
#: space them 7 % apart.
MAX_N_SCALE = 100
