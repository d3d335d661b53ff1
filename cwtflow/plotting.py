"""Figures of a state's images on sky axes (matplotlib WCSAxes), without pyplot.

Figures are built with `matplotlib.figure.Figure` directly, so nothing touches the global
pyplot state or needs a display; saving renders with the Agg (PNG) backend.

Layout: matplotlib's constrained layout places titles, axis labels and colour bars (each
colour bar is a child of its panel, so the layout reserves room for its labels); a first
layout pass measures the space the fixed aspect ratio of the maps leaves unused and the
figure is shrunk by it, so the canvas holds little empty margin whatever the map's shape.
Tick spacings are chosen from the panel's size in inches and the size of the tick labels,
so labels do not collide on thin survey strips; the latitude axis label is abbreviated when
the full one is longer than the panel is tall. Saving renders with the Agg backend in the format
the file's suffix names (`plot_format`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from numbers import Real
from pathlib import Path

import astropy.units as u
import matplotlib
import numpy as np
import xarray as xr
from astropy.visualization import (
    AsinhStretch,
    ImageNormalize,
    LinearStretch,
    LogStretch,
    SqrtStretch,
)
from astropy.visualization.wcsaxes import WCSAxes
from astropy.visualization.wcsaxes import conf as wcsaxes_conf
from astropy.wcs import WCS
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator
from matplotlib.transforms import Bbox

from .analysis import images
from .checks import integer, number
from .errors import InputError, ParameterError
from .io import atomic_output
from .maps import wcs_from_attrs
from .state import STATE_VARS

__all__ = ["STRETCHES", "plot_format", "plot_images"]

#: Names accepted by ``plot_images(stretch=...)`` and the astropy stretch each one means.
STRETCHES: dict[str, Callable[[], object]] = {
    "linear": LinearStretch,
    "sqrt": SqrtStretch,
    "log": LogStretch,
    "asinh": AsinhStretch,
}

# ctype prefix -> (longitude labels, latitude labels), each from longest to shortest.
_AXIS_LABELS = {
    "GLON": (
        ("Galactic longitude", "Gal. lon.", "l"),
        ("Galactic latitude", "Gal. lat.", "b"),
    ),
    "ELON": (
        ("Ecliptic longitude", "Ecl. lon.", "λ"),
        ("Ecliptic latitude", "Ecl. lat.", "β"),
    ),
    "RA": (("Right ascension", "RA", "α"), ("Declination", "Dec.", "δ")),
}
_DEFAULT_LABELS = (("Longitude", "Lon.", "lon"), ("Latitude", "Lat.", "lat"))

# Tick spacings (deg) to choose from: round values in degrees, arcminutes and arcseconds...
_DEG_STEPS = tuple(
    [s / 3600 for s in (1, 2, 5, 10, 15, 20, 30)]
    + [s / 60 for s in (1, 2, 5, 10, 15, 20, 30)]
    + [1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 180]
)
# ... and in hours, minutes and seconds of time for hour-angle axes (right ascension).
_HOUR_STEPS = tuple(
    15 * h
    for h in [s / 3600 for s in (1, 2, 5, 10, 15, 30)]
    + [s / 60 for s in (1, 2, 5, 10, 15, 30)]
    + [1, 2, 3, 4, 6, 12]
)

# Sizes in inches of the pieces around each map, for the first guess of the figure size (the
# layout pass then trims whatever is left unused).
_DECOR_WIDTH = 1.3  # latitude label and tick labels, colour bar with its tick labels and label
_DECOR_HEIGHT = 1.0  # title above, longitude tick labels and label below (generous: trimmed)
_CBAR_WIDTH = 0.14  # colour bar thickness
_CBAR_PAD = 0.08  # gap between a map and its colour bar
_LAYOUT_PASSES = 2
_PAD = 2 / 72  # inches around each panel's content (matplotlib's default: 3 / 72)


def _available(data: xr.Dataset) -> xr.Dataset:
    """The 2-D images of ``data``: all ten of a state (derived included), else its (y, x) vars."""
    if all(name in data for name in STATE_VARS):
        return images(data)
    names = [name for name, var in data.data_vars.items() if var.dims == ("y", "x")]
    return data[names]


def _check_choices(
    stretch: str, vmin: float | None, vmax: float | None, percentile: float, cmap: str
) -> Colormap:
    if not isinstance(stretch, str) or stretch not in STRETCHES:
        raise ParameterError(
            f"unknown stretch {stretch!r}; valid stretches: {', '.join(map(repr, STRETCHES))}"
        )
    for label, value in (("vmin", vmin), ("vmax", vmax)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
        ):
            raise ParameterError(f"{label} must be a finite number or None, got {value!r}")
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ParameterError(f"vmin must be below vmax, got vmin={vmin!r}, vmax={vmax!r}")
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, Real)
        or not 0 < percentile <= 100
    ):
        raise ParameterError(f"percentile must be a number in (0, 100], got {percentile!r}")
    try:
        return matplotlib.colormaps[cmap]
    except (KeyError, TypeError):
        raise ParameterError(
            f"unknown colour map {cmap!r}; valid: any name of matplotlib.colormaps, "
            "e.g. 'viridis', 'magma', 'Greys'"
        ) from None


def _limits(
    values: np.ndarray, vmin: float | None, vmax: float | None, percentile: float
) -> tuple[float, float]:
    """Colour range: ``vmin``/``vmax`` where given, else the central ``percentile`` % of the
    finite pixels; widened to a non-empty range for a constant image."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = np.percentile(finite, [(100 - percentile) / 2, (100 + percentile) / 2])
    lo = float(lo) if vmin is None else float(vmin)
    hi = float(hi) if vmax is None else float(vmax)
    if not lo < hi:
        if vmin is None and vmax is None:
            half = 0.5 * max(abs(lo), 1.0)
            lo, hi = lo - half, hi + half
        elif vmin is None:
            lo = hi - max(abs(hi), 1.0)
        else:
            hi = lo + max(abs(lo), 1.0)
    return lo, hi


def _round2(value: float, mode: str) -> float:
    """``value`` to two significant digits, rounded to nearest, down ("floor") or up ("ceil")."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(abs(value))) - 1)
    rounding = {"nearest": round, "floor": math.floor, "ceil": math.ceil}[mode]
    return float(round(rounding(value / scale) * scale, 12))


def _round_ticks(norm: ImageNormalize, count: int) -> list[float]:
    """Ticks of a stretched colour bar: values at evenly spaced colours, rounded to two
    significant digits (inwards at the ends), so they stay evenly spaced along the bar."""
    lo, hi = float(norm.vmin), float(norm.vmax)
    raw = np.asarray(norm.inverse(np.linspace(0.0, 1.0, count)), dtype=np.float64).ravel()
    ticks: list[float] = []
    for k, value in enumerate(raw):
        mode = "ceil" if k == 0 else "floor" if k == count - 1 else "nearest"
        rounded = _round2(float(value), mode)
        if lo <= rounded <= hi and rounded not in ticks:
            ticks.append(rounded)
    return ticks


def _tick_label(value: float, _position=None) -> str:
    """Short label of a rounded colour-bar tick: ``0.06``, ``1.2``, ``20``, ``1500``."""
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.2g}"
    return text.replace("-", "\N{MINUS SIGN}")


def _text_size(text: str, fontsize: float, renderer) -> tuple[float, float]:
    """Width and height in inches of ``text`` at ``fontsize`` points."""
    width, height, _ = renderer.get_text_width_height_descent(
        text, FontProperties(size=fontsize), ismath=False
    )
    return width / renderer.dpi, height / renderer.dpi


def _fontsize(key: str) -> float:
    return FontProperties(size=matplotlib.rcParams[key]).get_size_in_points()


def _world_extent(wcs: WCS, shape: tuple[int, int], axis: int) -> tuple[float, float]:
    """Range (deg) and largest magnitude of world coordinate ``axis`` along the map's middle
    row (axis 0) or column (axis 1), unwrapped across the 0/360 seam."""
    ny, nx = shape
    if axis == 0:
        x = np.linspace(-0.5, nx - 0.5, 257)
        y = np.full_like(x, (ny - 1) / 2)
    else:
        y = np.linspace(-0.5, ny - 0.5, 257)
        x = np.full_like(y, (nx - 1) / 2)
    world = np.asarray(wcs.celestial.pixel_to_world_values(x, y)[axis], dtype=np.float64)
    world = world[np.isfinite(world)]
    if world.size < 2:
        return 0.0, 0.0
    world = np.rad2deg(np.unwrap(np.deg2rad(world)))
    return float(np.ptp(world)), float(np.max(np.abs(world)))


def _sample_label(step: float, magnitude: float, signed: bool, hours: bool) -> str:
    """A tick label as wide as the widest WCSAxes writes for ``step`` (deg) on this axis."""
    if hours:
        text = "00h"
        if step < 15:
            text += "00m"
        if step < 0.25:
            text += "00s"
        return text
    digits = len(str(int(magnitude))) if magnitude >= 1 else 1
    text = ("−" if signed else "") + "0" * digits + "°"
    if step < 1:
        text += "00′"
    if step < 1 / 60:
        text += "00″"
    return text


def _set_ticks(
    ax: WCSAxes, wcs: WCS, shape: tuple[int, int], size: tuple[float, float], renderer
) -> tuple[float, ...]:
    """Tick spacings of both sky coordinates such that neighbouring labels keep clear, for a
    map drawn ``size`` (width, height) inches: the smallest round spacing that puts longitude
    labels (side by side) 2.2 label widths apart and latitude labels (stacked) 2.5 label
    heights apart; but if that leaves fewer than two ticks (a thin strip), the largest
    spacing giving two, as long as ticks stay 1.5 label heights or widths apart. WCSAxes'
    own check then drops any label that would still overlap another."""
    fontsize = _fontsize("xtick.labelsize")
    spacings = []
    for axis, length in ((0, size[0]), (1, size[1])):
        coord = ax.coords[axis]
        extent, magnitude = _world_extent(wcs, shape, axis)
        if extent <= 0 or length <= 0:
            continue
        hours = coord.coord_unit == u.hourangle
        signed = coord.coord_type != "longitude"
        steps = _HOUR_STEPS if hours else _DEG_STEPS

        # Distance between neighbouring ticks, in label widths (side by side) or heights.
        gaps = []
        for step in steps:
            width, height = _text_size(
                _sample_label(step, magnitude, signed, hours), fontsize, renderer
            )
            gaps.append((step, step / extent * length / (height if axis else width)))
        chosen = next((step for step, gap in gaps if gap >= (2.5 if axis else 2.2)), None)
        if chosen is None or chosen > extent / 2:
            two = [step for step, gap in gaps if step <= extent / 2 and gap >= 1.5]
            if two:
                chosen = two[-1]
        coord.set_ticks(spacing=(chosen or steps[-1]) * u.deg)
        coord.set_ticklabel(exclude_overlapping=True)
        spacings.append(chosen)
    return tuple(spacings)


def _axis_label(choices: tuple[str, ...], length: float, renderer) -> str:
    """The longest of ``choices`` that fits within ``length`` inches."""
    fontsize = _fontsize("axes.labelsize")
    for text in choices:
        if _text_size(text, fontsize, renderer)[0] <= 0.9 * length:
            return text
    return choices[-1]


def _colorbar_locator(parent: WCSAxes) -> Callable:
    """Place a colour bar just right of the drawn map (after its aspect ratio is applied),
    as tall as the map and of fixed thickness in inches."""

    def locate(cax, renderer) -> Bbox:
        fig = parent.figure
        width, _ = fig.get_size_inches()
        box = parent.get_position(original=False)
        return Bbox.from_bounds(box.x1 + _CBAR_PAD / width, box.y0, _CBAR_WIDTH / width, box.height)

    return locate


def _colorbar_ticks(cbar, norm, length: float, stretch: str) -> list[float]:
    """At most one tick label every 0.35 inch along a colour bar ``length`` inches long, all
    within the colour range (the clipping norm would pin outside ones to the bar's ends)."""
    count = max(2, min(6, int(length / 0.35) + 1))
    if stretch == "linear":
        lo, hi = float(norm.vmin), float(norm.vmax)
        ticks = MaxNLocator(nbins=count - 1).tick_values(lo, hi)
        span = hi - lo
        ticks = [float(t) for t in ticks if lo - 1e-9 * span <= t <= hi + 1e-9 * span]
    else:
        ticks = _round_ticks(norm, count)
        cbar.formatter = FuncFormatter(_tick_label)
    cbar.locator = FixedLocator(ticks)
    cbar.minorticks_off()
    return ticks


def _map_size(ax: WCSAxes) -> tuple[float, float]:
    """Width and height in inches of the drawn map (after its aspect ratio is applied)."""
    fig = ax.figure
    width, height = fig.get_size_inches()
    box = ax.get_position(original=False)
    return box.width * width, box.height * height


def _unused(fig: Figure) -> tuple[float, float]:
    """Width and height (inches) of the figure outside its content and the layout's pads.

    With the "compressed" layout, the room that the maps' fixed aspect ratio leaves unused
    ends up around the grid of panels, so this is all the empty margin there is to cut.
    """
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    pads = fig.get_layout_engine().get()
    width, height = fig.get_size_inches()
    return (
        max(0.0, width - box.width - 2 * pads["w_pad"]),
        max(0.0, height - box.height - 2 * pads["h_pad"]),
    )


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


def plot_images(
    state: xr.Dataset,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    ncols: int | None = None,
    panel_width: float | None = None,
    cmap: str = "viridis",
    dpi: int = 100,
    stretch: str = "linear",
    vmin: float | None = None,
    vmax: float | None = None,
    percentile: float = 100.0,
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
        Width of one panel in inches, colour bar and labels included (height follows the
        map's aspect ratio); default 5, growing up to 16 for wide strips such as a
        Galactic-plane survey. The figure is then trimmed to its content: it may come out a
        little narrower or shorter than asked.
    cmap : str
        Matplotlib colour map. Boolean images (e.g. ``support_2d``) use its two end colours,
        with a colour bar of two ticks, ``False`` and ``True``.
    dpi : int
        Resolution of the saved image (1 to 1000 dots per inch).
    stretch : {"linear", "sqrt", "log", "asinh"}
        How values map to colours between the colour range's ends (astropy.visualization
        stretches, see `STRETCHES`); "sqrt", "log" and "asinh" bring out faint structure
        next to bright sources. The colour bar's ticks sit at round values evenly spaced
        in colour. Boolean images ignore it.
    vmin, vmax : float, optional
        Ends of the colour range of every (non-boolean) panel; a missing end comes from
        ``percentile``.
    percentile : float
        Without ``vmin``/``vmax``, the colour range spans this central percentage of each
        image's finite pixels (e.g. 99.5 clips the brightest and faintest 0.25 %); default
        100: the full range from minimum to maximum.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot; display it in Jupyter by evaluating it).

    Raises
    ------
    InputError
        Unknown image name, stretch or colour map, no WCS, bad colour range or layout values.
    ParameterError
        A path whose suffix names no image format, a bad ``dpi``.
    StoreError
        ``path`` cannot be written.
    """
    if not isinstance(state, xr.Dataset):
        raise InputError(f"expected an xarray.Dataset, got {type(state).__name__}")
    fmt = None if path is None else plot_format(path)
    dpi = integer("dpi", dpi, low=1, high=1000)
    if isinstance(names, str):
        names = [names]
    colormap = _check_choices(stretch, vmin, vmax, percentile, cmap)
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
    map_width = max(panel_width - _DECOR_WIDTH, 0.3 * panel_width)
    map_height = map_width * ny / nx
    fig = Figure(
        figsize=(ncols * panel_width, nrows * (map_height + _DECOR_HEIGHT)), layout="compressed"
    )
    # A little more room between columns than around texts: a colour-bar label should read as
    # belonging to its own panel, not to the map on its right.
    fig.get_layout_engine().set(w_pad=_PAD, h_pad=_PAD, wspace=0.05, hspace=0.0)
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    labels = _AXIS_LABELS.get(wcs.wcs.ctype[0][:4].rstrip("-"), _DEFAULT_LABELS)
    panels = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1, projection=wcs)
        values = np.asarray(available[name].values)
        units = available[name].attrs.get("units", "")
        if values.dtype == bool:
            two = ListedColormap([colormap(0.0), colormap(1.0)])
            norm = BoundaryNorm([-0.5, 0.5, 1.5], 2)
            im = ax.imshow(
                values.astype(np.uint8),
                origin="lower",
                cmap=two,
                norm=norm,
                interpolation="nearest",
            )
        else:
            lo, hi = _limits(values.astype(np.float64), vmin, vmax, percentile)
            norm = ImageNormalize(vmin=lo, vmax=hi, stretch=STRETCHES[stretch](), clip=True)
            im = ax.imshow(
                values, origin="lower", cmap=colormap, norm=norm, interpolation="nearest"
            )
        ax.set_title(name)
        ax.coords[0].set_axislabel(_axis_label(labels[0], map_width, renderer))
        # All panels share the sky grid: coordinates are labelled on the bottom panel of each
        # column and the left panel of each row only (ticks stay on all).
        for axis, outer in ((0, i + ncols >= len(names)), (1, i % ncols == 0)):
            if not outer:
                ax.coords[axis].set_ticklabel_visible(False)
                ax.coords[axis].set_axislabel_position("")
        cax = ax.inset_axes([1.0, 0.0, 0.05, 1.0])
        cax.set_axes_locator(_colorbar_locator(ax))
        cbar = fig.colorbar(im, cax=cax, label=units if units not in ("", "1") else None)
        if values.dtype == bool:
            cbar.set_ticks([0, 1], labels=["False", "True"])
            cbar.minorticks_off()
        panels.append((ax, cbar, norm, values.dtype == bool))

    def decorate(panel: tuple, width: float, height: float) -> tuple:
        """Sky ticks, latitude label and colour-bar ticks for a map ``width`` x ``height``
        inches; returns the choices that change the panel's size (not the colour-bar ticks,
        whose labels differ by a character or so)."""
        ax, cbar, norm, boolean = panel
        spacings = _set_ticks(ax, wcs, (ny, nx), (width, height), renderer)
        ylabel = _axis_label(labels[1], height, renderer)
        ax.coords[1].set_axislabel(ylabel)
        if not boolean:
            _colorbar_ticks(cbar, norm, height, stretch)
        return spacings, ylabel

    decorations = [decorate(panel, map_width, map_height) for panel in panels]
    axes = [ax for ax, *_ in panels]
    # WCSAxes samples each frame edge at 1000 points to place ticks, and costs ~0.1 s per
    # tick that coincides with an edge (the usual case on CAR maps with round extents);
    # 50 samples place ticks as well on these panels (straight or gently curved edges)
    # and make drawing several times faster.
    with wcsaxes_conf.set_temp("frame_boundary_samples", 50):
        # Layout pass: run the layout, set ticks and labels for the maps' drawn size, shrink
        # the figure to its content (the maps keep their size); once more if the ticks or
        # labels changed, as they change the content's size (drawing runs the final layout).
        for _ in range(_LAYOUT_PASSES):
            fig.draw_without_rendering()
            cut_w, cut_h = _unused(fig)
            sizes = [_map_size(ax) for ax in axes]
            size = fig.get_size_inches()
            fig.set_size_inches(size[0] - cut_w, size[1] - cut_h)
            chosen = [
                decorate(panel, *map_size) for panel, map_size in zip(panels, sizes, strict=True)
            ]
            if chosen == decorations:
                break
            decorations = chosen
        if path is not None:
            target = Path(path).expanduser()
            with atomic_output(target, overwrite=True) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi)
    return fig
