"""Figures of a state's images on sky axes (matplotlib WCSAxes), without pyplot.

Figures are built with `matplotlib.figure.Figure` directly, so nothing touches the global
pyplot state or needs a display; saving renders with the Agg backend in the format the file's
suffix names (`plot_format`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import xarray as xr
from astropy.visualization.wcsaxes import conf as wcsaxes_conf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .analysis import images
from .checks import integer, number
from .errors import InputError, ParameterError
from .io import atomic_output
from .maps import wcs_from_attrs
from .state import STATE_VARS

__all__ = ["plot_format", "plot_images"]

_AXIS_LABELS = {
    "GLON": ("Galactic longitude", "Galactic latitude"),
    "ELON": ("Ecliptic longitude", "Ecliptic latitude"),
    "RA": ("Right ascension", "Declination"),
}


def plot_format(path: str | os.PathLike[str]) -> str:
    """The matplotlib format a figure saved to ``path`` is written in: its suffix, lower case.

    Every format matplotlib's Agg canvas saves (``Figure().canvas.get_supported_filetypes()``:
    png, pdf, svg, jpg, tif, eps, ...) except ``pgf`` (it needs a LaTeX installation); any
    other suffix, or none, raises `ParameterError` (so a run can refuse it before any work).
    """
    if not isinstance(path, str | os.PathLike):
        raise ParameterError(f"plot path must be a file name, got {type(path).__name__}")
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = sorted(set(FigureCanvasAgg(Figure()).get_supported_filetypes()) - {"pgf"})
    if suffix not in formats:
        raise ParameterError(
            f"cannot tell the image format of {Path(path).name!r}: its suffix must be one of "
            + ", ".join(f".{f}" for f in formats)
        )
    return suffix


def _available(data: xr.Dataset) -> xr.Dataset:
    """The 2-D images of ``data``: all ten of a state (derived included), else its (y, x) vars."""
    if all(name in data for name in STATE_VARS):
        return images(data)
    names = [name for name, var in data.data_vars.items() if var.dims == ("y", "x")]
    return data[names]


def plot_images(
    state: xr.Dataset,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    ncols: int | None = None,
    panel_width: float | None = None,
    cmap: str = "viridis",
    dpi: int = 100,
) -> Figure:
    """Grid of a state's images on sky axes, one panel per image with its colour bar.

    Parameters
    ----------
    state : xarray.Dataset
        A CWT state (its ten images of `cwtflow.state.IMAGES` are available, derived ones
        included) or any Dataset of (y, x) images with the WCS in ``attrs["wcs"]`` (e.g. input
        maps).
    path : path-like, optional
        Save the figure there (atomically, replacing an existing file) in the format its
        suffix names (`plot_format`: .png, .pdf, .svg, ...).
    names : sequence of str, optional
        Images to show, in this order; default: all available images.
    ncols : int, optional
        Panels per row; default 1 for maps more than four times wider than tall, else 2.
    panel_width : float, optional
        Width of one panel in inches (height follows the map's aspect ratio); default 5,
        growing up to 16 for wide strips such as a Galactic-plane survey.
    cmap : str
        Matplotlib colour map.
    dpi : int
        Resolution of the saved image (1 to 1000 dots per inch).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot; display it in Jupyter by evaluating it).

    Raises
    ------
    InputError
        Unknown image name, no WCS, or bad layout values.
    ParameterError
        A path whose suffix names no image format, an unknown colour map, a bad ``dpi``.
    StoreError
        ``path`` cannot be written.
    """
    if not isinstance(state, xr.Dataset):
        raise InputError(f"expected an xarray.Dataset, got {type(state).__name__}")
    fmt = None if path is None else plot_format(path)
    dpi = integer("dpi", dpi, low=1, high=1000)
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise ParameterError(f"unknown colour map {cmap!r}")
    if isinstance(names, str):
        names = [names]
    wcs = wcs_from_attrs(state.attrs)
    available = _available(state)
    names = list(available.data_vars) if names is None else list(names)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise InputError(
            f"unknown image(s) {', '.join(map(repr, unknown))}; available: "
            f"{', '.join(available.data_vars) or 'none'}"
        )
    if not names:
        raise InputError("no images to plot")
    ny, nx = available.sizes["y"], available.sizes["x"]
    if ncols is None:
        ncols = 1 if nx > 4 * ny else 2
    ncols = min(integer("ncols", ncols, low=1), len(names))
    if panel_width is None:
        panel_width = min(16.0, max(5.0, 1.25 * nx / ny))
    panel_width = number("panel_width", panel_width, low=0.0, low_open=True, high=100.0)
    nrows = math.ceil(len(names) / ncols)
    panel_height = panel_width * ny / nx + 1.2
    fig = Figure(figsize=(ncols * panel_width, nrows * panel_height))
    FigureCanvasAgg(fig)
    xlabel, ylabel = _AXIS_LABELS.get(wcs.wcs.ctype[0][:4].rstrip("-"), ("Longitude", "Latitude"))
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1, projection=wcs)
        values = np.asarray(available[name].values)
        if values.dtype == bool:
            values = values.astype(np.uint8)
        im = ax.imshow(values, origin="lower", cmap=cmap, interpolation="nearest")
        units = available[name].attrs.get("units", "")
        ax.set_title(name)
        ax.coords[0].set_axislabel(xlabel)
        ax.coords[1].set_axislabel(ylabel)
        fig.colorbar(im, ax=ax, shrink=0.9, label=units if units not in ("", "1") else None)
    if path is not None:
        target = Path(path).expanduser()
        # WCSAxes samples each frame edge at 1000 points to place ticks, and costs ~0.1 s per
        # tick that coincides with an edge (the usual case on CAR maps with round extents);
        # 200 samples place ticks as well on these panels and make saving ~4x faster.
        with (
            wcsaxes_conf.set_temp("frame_boundary_samples", 200),
            atomic_output(target, overwrite=True) as tmp,
        ):
            fig.savefig(tmp, format=fmt, dpi=dpi)
    return fig
