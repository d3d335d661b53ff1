"""The tutorial's analyses of a state: derived images, metric tables, differences of states.

Every function takes a state Dataset and returns a new object; nothing is cached or mutated.
Dask-backed states stay lazy: images and differences are lazy Datasets, and only the metric
tables compute (their numbers).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from astropy.table import Table

from .errors import InputError, NotFoundError, ParameterError
from .state import CUBES, IMAGES, STATE_VARS, variable_attrs

__all__ = [
    "cube_metrics",
    "cubes",
    "derived_images",
    "difference",
    "image_metrics",
    "images",
    "state_metrics",
]

METRIC_COLUMNS = ("Name", "Shape", "Variance", "Mean", "Max value", "Min value", "Sum values")


def _check_state(state: xr.Dataset, what: str = "state") -> xr.Dataset:
    """A Dataset holding every state variable, or an `InputError` naming what is missing."""
    if not isinstance(state, xr.Dataset):
        raise InputError(f"expected a CWT {what} (xarray.Dataset), got {type(state).__name__}")
    missing = [name for name in STATE_VARS if name not in state]
    if missing:
        raise InputError(f"{what} is not a CWT state: missing {', '.join(missing)}")
    return state


def _check_name(name: object, known: tuple[str, ...], kind: str) -> None:
    if not isinstance(name, str):
        raise ParameterError(f"{kind} name must be a string, got {name!r}")
    if name not in known:
        raise NotFoundError(f"{name!r} is not a known {kind}; {kind}s are {', '.join(known)}")


def derived_images(state: xr.Dataset) -> xr.Dataset:
    """residual, model_plus_approx, support_2d and maximal of ``state`` (spec definitions)."""
    _check_state(state)
    model_plus_approx = state["model"] + state["approx"]
    support_2d = state["support"].any("scale")
    out = {
        "model_plus_approx": model_plus_approx,
        "residual": state["counts"] - model_plus_approx,
        "support_2d": support_2d,
        "maximal": (state["transform_3d"] * support_2d).max("scale"),
    }
    return xr.Dataset({k: v.assign_attrs(variable_attrs(k)) for k, v in out.items()})


def images(state: xr.Dataset) -> xr.Dataset:
    """The ten 2-D images in the reference's order (stored and derived)."""
    _check_state(state)
    derived = derived_images(state)
    merged = {name: state[name] if name in state else derived[name] for name in IMAGES}
    return xr.Dataset(merged, attrs=dict(state.attrs))


def cubes(state: xr.Dataset) -> xr.Dataset:
    """The three (scale, y, x) cubes: transform_3d, error, support."""
    _check_state(state)
    return state[list(CUBES)]


def _metric_row(name: str, shape: str, values: xr.DataArray) -> tuple:
    values = values.astype(np.float64)
    stats = xr.Dataset(
        {
            "var": values.var(),
            "mean": values.mean(),
            "max": values.max(),
            "min": values.min(),
            "sum": values.sum(),
        }
    ).compute()
    return (name, shape, *(float(stats[k]) for k in ("var", "mean", "max", "min", "sum")))


def _table(rows: list[tuple]) -> Table:
    return Table(rows=rows, names=METRIC_COLUMNS, dtype=(str, str, *[np.float64] * 5))


def image_metrics(state: xr.Dataset, name: str) -> Table:
    """Variance (population), mean, max, min and sum of one 2-D image, as a one-row table.

    An unknown ``name`` raises `NotFoundError` (a `KeyError`)."""
    _check_name(name, IMAGES, "image")
    _check_state(state)
    return _table([_metric_row(name, "2D image", images(state)[name])])


def cube_metrics(state: xr.Dataset, name: str, *, per_scale: bool = False) -> Table:
    """Metrics of one cube: the whole cube in one row, or one row per scale (``per_scale``).

    An unknown ``name`` raises `NotFoundError` (a `KeyError`)."""
    _check_name(name, CUBES, "cube")
    _check_state(state)
    cube = state[name]
    if not per_scale:
        return _table([_metric_row(name, "3D cube", cube)])
    rows = [
        _metric_row(f"{name} (scale {float(s):g})", "2D image", cube.isel(scale=i))
        for i, s in enumerate(cube["scale"].values)
    ]
    return _table(rows)


def state_metrics(state: xr.Dataset) -> Table:
    """Metrics of every image and every cube (whole) of the state, one row each."""
    _check_state(state)
    imgs = images(state)
    rows = [_metric_row(name, "2D image", imgs[name]) for name in IMAGES]
    rows += [_metric_row(name, "3D cube", state[name]) for name in CUBES]
    return _table(rows)


def difference(later: xr.Dataset, earlier: xr.Dataset) -> xr.Dataset:
    """``later - earlier``: numeric fields subtract, support is XOR, counts and background come
    from ``later`` (the first operand). The result is a state-like Dataset.

    Both must be states of one map (same sizes), else `InputError`."""
    _check_state(later, "later state")
    _check_state(earlier, "earlier state")
    if dict(later.sizes) != dict(earlier.sizes):
        raise InputError(
            f"states of different shapes cannot be subtracted: {dict(later.sizes)} vs "
            f"{dict(earlier.sizes)}"
        )
    out = later.copy()
    for name in STATE_VARS:
        if name in ("counts", "background"):
            continue
        if name == "support":
            out[name] = later[name] ^ earlier[name]
        else:
            out[name] = later[name] - earlier[name]
        out[name].attrs = dict(later[name].attrs)
    out.attrs = {**later.attrs, "difference": "later - earlier"}
    return out
