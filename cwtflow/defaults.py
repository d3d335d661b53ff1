"""Default settings of the public API, in a module that imports nothing.

`cwtflow.CWT` takes its keyword defaults from `CWT_DEFAULTS` and the command line shows and
uses the same values without importing the engine (so that ``cwtflow --help`` starts fast).
`CATALOG_DEFAULTS` mirrors `cwtflow.find_sources`'s defaults; a test checks the two agree.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CATALOG_DEFAULTS", "CWT_DEFAULTS", "KERNEL_DEFAULTS"]

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
}

#: Keyword defaults of `cwtflow.find_sources` that the command line exposes.
CATALOG_DEFAULTS: dict[str, Any] = {
    "min_significance": 5.0,
    "deblend": True,
    "contrast": 0.2,
    "min_separation": None,
}

#: Kernel defaults of the command line: the CWT tutorial's (`CWTKernels` itself has none).
KERNEL_DEFAULTS: dict[str, Any] = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}
