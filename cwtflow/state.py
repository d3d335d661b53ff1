"""The CWT state as one xarray Dataset: its variables, their metadata, and how it is built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from .kernels import CWTKernels

__all__ = [
    "CARRIED",
    "CUBES",
    "IMAGES",
    "STATE_VARS",
    "VARIABLES",
    "initial_state",
    "new_state",
]

# name -> (dims, units, description); the state's variables in the reference's order.
VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "counts": (("y", "x"), "count", "observed counts C"),
    "background": (("y", "x"), "count", "predicted background counts B"),
    "model": (("y", "x"), "count", "model M: accumulated positive significant transform"),
    "approx": (("y", "x"), "count", "approximation A: conv(C - M - B, G)"),
    "approx_bkg": (("y", "x"), "count", "background approximation conv(B, G)"),
    "transform_2d": (("y", "x"), "count", "sum over scales of the supported transform"),
    "model_plus_approx": (("y", "x"), "count", "M + A"),
    "residual": (("y", "x"), "count", "residual C - (M + A)"),
    "maximal": (("y", "x"), "count", "max over scales of the transform, on the 2-D support"),
    "support_2d": (("y", "x"), "1", "pixel is in the support at any scale"),
    "transform_3d": (("scale", "y", "x"), "count", "wavelet transform T_i of the excess"),
    "error": (("scale", "y", "x"), "count", "error E_i = sqrt(conv(M + B + A, K_i**2))"),
    "support": (("scale", "y", "x"), "1", "support S_i: significant pixels, accumulated"),
    "exposure": (("y", "x"), "cm2 s", "exposure (optional input, carried for fluxes)"),
}

#: Variables stored in a state (the others are derived from them).
STATE_VARS = (
    "counts",
    "background",
    "model",
    "approx",
    "approx_bkg",
    "transform_2d",
    "transform_3d",
    "error",
    "support",
)
#: Optional inputs a state carries along unchanged when its input has them.
CARRIED = ("exposure",)
#: The 2-D images in the reference's order, derived ones included.
IMAGES = (
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
)
#: The cubes, on (scale, y, x).
CUBES = ("transform_3d", "error", "support")


def variable_attrs(name: str) -> dict[str, str]:
    """Units and description of a state or derived variable."""
    _, units, description = VARIABLES[name]
    return {"units": units, "long_name": description}


def new_state(template: xr.Dataset, arrays: Mapping[str, Any], kernels: CWTKernels) -> xr.Dataset:
    """A state Dataset holding ``arrays`` on the grid, coordinates and attrs of ``template``.

    ``arrays`` maps every name of `STATE_VARS` to a numpy or dask array of its dims' shape;
    the optional inputs of `CARRIED` (exposure) come along from ``template`` when it has them.
    """
    data_vars = {
        name: (VARIABLES[name][0], arrays[name], variable_attrs(name)) for name in STATE_VARS
    }
    for name in CARRIED:
        if name in template.data_vars:
            data_vars[name] = template[name].variable
    coords = {
        name: template.coords[name].variable for name in ("lon", "lat") if name in template.coords
    }
    coords["scale"] = xr.Variable(
        "scale", np.asarray(kernels.scales), {"units": "pixel", "long_name": "wavelet scale"}
    )
    return xr.Dataset(data_vars, coords=coords, attrs=dict(template.attrs))


def initial_state(data: xr.Dataset, kernels: CWTKernels, *, dtype: str | None = None) -> xr.Dataset:
    """The state before the first iteration: inputs, everything else zero / False.

    Works for numpy- and dask-backed inputs alike (zeros follow the input's array type);
    the zero planes have ``dtype`` (default: the counts' dtype), the inputs stay as given.
    """
    counts = data["counts"].data
    dtype = counts.dtype if dtype is None else np.dtype(dtype)
    if isinstance(counts, np.ndarray):
        zeros2 = np.zeros(counts.shape, dtype=dtype)
        zeros3 = np.zeros((kernels.n_scale, *counts.shape), dtype=dtype)
    else:
        import dask.array as da

        zeros2 = da.zeros_like(counts, dtype=dtype)
        zeros3 = da.stack([zeros2] * kernels.n_scale)
    arrays = {
        "counts": counts,
        "background": data["background"].data,
        "model": zeros2,
        "approx": zeros2,
        "approx_bkg": zeros2,
        "transform_2d": zeros2,
        "transform_3d": zeros3,
        "error": zeros3,
        "support": zeros3 != 0,
    }
    return new_state(data, arrays, kernels)
