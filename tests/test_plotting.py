"""Plot helper: a grid of sky images (WCSAxes), saved as a valid PNG; colour scales; layout
(little empty margin, no overlapping texts) on square maps and wide survey strips."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from astropy.visualization import AsinhStretch, LinearStretch, LogStretch, SqrtStretch
from astropy.visualization.wcsaxes import WCSAxes
from helpers import random_arrays
from matplotlib.colors import BoundaryNorm

import cwtflow
from cwtflow import InputError
from cwtflow.plotting import plot_images
from cwtflow.state import IMAGES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def state():
    counts, background = random_arrays(11, (30, 48))
    data = cwtflow.make_maps(counts, background)
    return cwtflow.CWT(cwtflow.CWTKernels(2, 1.5, 1.4), max_iter=2).analyze(data)


def _image_axes(fig):
    return [ax for ax in fig.axes if isinstance(ax, WCSAxes)]


@pytest.mark.slow
def test_grid_of_all_images_saved_as_png(tmp_path, state):
    path = tmp_path / "state.png"
    fig = plot_images(state, path, dpi=40)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == list(IMAGES)
    assert all(len(ax.get_images()) == 1 for ax in axes)
    # One colour bar per panel, a child of it (so the layout keeps room for its labels).
    assert len(fig.axes) == len(IMAGES)
    assert all(len(ax.child_axes) == 1 for ax in axes)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    width, height = fig.get_size_inches() * 40
    assert pixels.shape[:2] == (round(height), round(width))
    assert pixels[..., :3].std() > 0  # not a blank canvas
    assert list(tmp_path.iterdir()) == [path]


def test_selected_images_and_input_maps(tmp_path, state):
    fig = plot_images(state, names=["residual", "support_2d"], ncols=1)
    assert [ax.get_title() for ax in _image_axes(fig)] == ["residual", "support_2d"]
    support = _image_axes(fig)[1].get_images()[0].get_array()
    assert support.max() == 1 and support.min() == 0
    maps = cwtflow.make_maps(state["counts"].values, state["background"].values)
    fig = plot_images(maps)
    assert [ax.get_title() for ax in _image_axes(fig)] == ["counts", "background"]
    assert _image_axes(fig)[0].coords[0].get_axislabel() == "Galactic longitude"


def test_bad_arguments(state):
    with pytest.raises(InputError, match=r"unknown image.*'nope'"):
        plot_images(state, names=["counts", "nope"])
    with pytest.raises(InputError, match="no images"):
        plot_images(state, names=[])
    with pytest.raises(InputError, match="ncols"):
        plot_images(state, ncols=0)
    with pytest.raises(InputError, match=r"expected an xarray\.Dataset"):
        plot_images(state["counts"])


# --- colour scales --------------------------------------------------------------------------


def _norm(fig, title):
    (ax,) = [ax for ax in _image_axes(fig) if ax.get_title() == title]
    return ax.get_images()[0].norm


@pytest.mark.slow
def test_stretch_and_colour_range(state):
    counts = state["counts"].values
    fig = plot_images(state, names=["counts"])
    norm = _norm(fig, "counts")
    assert isinstance(norm.stretch, LinearStretch)  # default: linear over min..max
    assert (norm.vmin, norm.vmax) == (counts.min(), counts.max())
    for name, kind in (("sqrt", SqrtStretch), ("log", LogStretch), ("asinh", AsinhStretch)):
        norm = _norm(plot_images(state, names=["counts"], stretch=name), "counts")
        assert isinstance(norm.stretch, kind)
    norm = _norm(plot_images(state, names=["counts"], vmin=1.0, vmax=3.0), "counts")
    assert (norm.vmin, norm.vmax) == (1.0, 3.0)
    norm = _norm(plot_images(state, names=["counts"], percentile=90), "counts")
    assert (norm.vmin, norm.vmax) == tuple(np.percentile(counts, [5, 95]))
    norm = _norm(plot_images(state, names=["counts"], percentile=90, vmin=-1.0), "counts")
    assert (norm.vmin, norm.vmax) == (-1.0, np.percentile(counts, 95))


def test_stretched_colour_bar_ticks_are_round_and_inside(state):
    fig = plot_images(state, names=["counts", "residual"], stretch="log")
    fig.canvas.draw()
    for ax in _image_axes(fig):
        cax = ax.child_axes[0]
        norm = ax.get_images()[0].norm
        ticks = cax.get_yticks()
        assert len(ticks) >= 2
        assert np.all((ticks >= norm.vmin) & (ticks <= norm.vmax))
        labels = [t.get_text() for t in cax.get_yticklabels()]
        assert all(len(text) <= 5 for text in labels), labels  # "0.06", "1.2", "20"


def test_constant_image_gets_a_colour_range(state):
    maps = cwtflow.make_maps(np.zeros((20, 30)), np.ones((20, 30)))
    norm = _norm(plot_images(maps, names=["counts"]), "counts")
    assert norm.vmin < 0 < norm.vmax


def test_boolean_image_has_two_colours_and_two_ticks(state):
    fig = plot_images(state, names=["residual", "support_2d"])
    fig.canvas.draw()
    ax = _image_axes(fig)[1]
    image = ax.get_images()[0]
    assert image.cmap.N == 2
    assert isinstance(image.norm, BoundaryNorm)
    cax = ax.child_axes[0]
    assert list(cax.get_yticks()) == [0, 1]
    assert [t.get_text() for t in cax.get_yticklabels()] == ["False", "True"]
    # Any boolean variable, not only the support.
    maps = cwtflow.make_maps(state["counts"].values, state["background"].values)
    maps["bright"] = maps["counts"] > 2
    image = _image_axes(plot_images(maps, names=["bright"]))[0].get_images()[0]
    assert image.cmap.N == 2


def test_bad_colour_arguments(state):
    with pytest.raises(InputError, match=r"'cubic'.*'linear', 'sqrt', 'log', 'asinh'"):
        plot_images(state, stretch="cubic")
    with pytest.raises(InputError, match=r"vmin must be below vmax.*vmin=3.*vmax=1"):
        plot_images(state, vmin=3.0, vmax=1.0)
    with pytest.raises(InputError, match=r"vmax must be a finite number.*nan"):
        plot_images(state, vmax=float("nan"))
    with pytest.raises(InputError, match=r"percentile.*\(0, 100\].*150"):
        plot_images(state, percentile=150)
    with pytest.raises(InputError, match=r"colour map 'nope'"):
        plot_images(state, cmap="nope")


# --- layout -----------------------------------------------------------------------------------


def _blank_fractions(path):
    """Fractions of the PNG's pixel rows and columns that are pure background."""
    pixels = matplotlib.image.imread(path)[..., :3]
    blank = np.all(np.abs(pixels - pixels[0, 0]) < 1e-3, axis=-1)
    return blank.all(axis=1).mean(), blank.all(axis=0).mean()


def _area(a, b):
    """Area (pixels) of the intersection of two display-space bounding boxes."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0) * max(height, 0)


def _sky(shape, seed=3):
    """Input maps of ``shape`` on the default 0.1 deg CAR grid, with a boolean image."""
    counts, background = random_arrays(seed, shape)
    maps = cwtflow.make_maps(counts, background)
    maps["bright"] = maps["counts"] > 1
    return maps


SHAPES = {
    "strip": (60, 1200),  # 6 x 120 deg: a Galactic-plane survey strip, one panel per row
    "square": (48, 48),  # two panels per row
    "demo": (200, 400),  # the README's picture
}


@pytest.mark.parametrize("kind", list(SHAPES))
def test_little_empty_margin(tmp_path, kind):
    # Before the layout rework, 20-38 % of the rows or columns of such figures were blank
    # (fixed 1.2 in of height per panel, default subplot margins). Now the figure is cut to
    # its content: the blank rows/columns left are the pads (2/72 in) around each panel's
    # texts and the gaps between a title, tick labels and axis label - a few % of a panel,
    # most for thin strips where texts are a large part of a panel. Measured 2-6 %.
    path = tmp_path / "maps.png"
    plot_images(_sky(SHAPES[kind]), path, dpi=60)
    rows, cols = _blank_fractions(path)
    assert rows < 0.10 and cols < 0.10, (rows, cols)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.slow
def test_nothing_overlaps(kind):
    fig = plot_images(_sky(SHAPES[kind]))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    axes = _image_axes(fig)
    assert len(axes) == 3
    colour_bars = [ax.child_axes[0] for ax in axes]
    frames = [ax.get_window_extent(renderer) for ax in axes + colour_bars]
    panels = [ax.get_tightbbox(renderer) for ax in axes]  # map, texts and its colour bar
    for i, cax in enumerate(colour_bars):
        # Whole panels (labels included) keep clear of each other and of the canvas edges.
        assert canvas.x0 <= panels[i].x0 and panels[i].x1 <= canvas.x1 + 0.5
        assert canvas.y0 <= panels[i].y0 and panels[i].y1 <= canvas.y1 + 0.5
        for j in range(i + 1, len(axes)):
            assert _area(panels[i], panels[j]) < 1, (kind, i, j)
        # Colour-bar label and tick labels touch no other map or colour bar.
        texts = [cax.yaxis.label] + [t for t in cax.get_yticklabels() if t.get_text()]
        for text in texts:
            box = text.get_window_extent(renderer)
            others = [f for k, f in enumerate(frames) if k not in (i, len(axes) + i)]
            assert all(_area(box, other) < 1 for other in others), (kind, text.get_text())
        # Tick labels of the colour bar do not overlap each other.
        boxes = [t.get_window_extent(renderer) for t in texts[1:]]
        assert all(_area(a, b) < 1 for k, a in enumerate(boxes) for b in boxes[k + 1 :])


def _tick_label_boxes(coord, renderer):
    """Display boxes of a WCSAxes coordinate's tick labels, per side of the frame, whether
    drawn or dropped as overlapping (WCSAxes keeps them privately: no public accessor)."""
    labels = coord._ticklabels
    if not coord.get_ticklabel_visible():
        return {}
    return {
        side: [
            box
            for i in range(len(labels.text[side]))
            if (box := labels._get_bb(side, i, renderer)) is not None
        ]
        for side in labels.get_visible_axes()
        if side != "#"
    }


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.slow
def test_sky_tick_labels_keep_clear(kind):
    fig = plot_images(_sky(SHAPES[kind]))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labelled = {0: 0, 1: 0}
    for ax in _image_axes(fig):
        for axis, coord in enumerate(ax.coords):
            for side, boxes in _tick_label_boxes(coord, renderer).items():
                pairs = [(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1 :]]
                # Apart by at least half a label height (no reliance on WCSAxes dropping any).
                pad = 0.5 * max(box.height for box in boxes)
                assert all(_area(a.padded(pad / 2), b.padded(pad / 2)) < 1 for a, b in pairs), (
                    kind,
                    side,
                    coord.get_axislabel(),
                )
                labelled[axis] = max(labelled[axis], len(boxes))
    # Both coordinates are labelled, with at least two ticks (a scale to read).
    assert labelled[0] >= 2 and labelled[1] >= 2, labelled


def test_figure_follows_the_map_shape():
    strip = plot_images(_sky(SHAPES["strip"]))
    width, height = strip.get_size_inches()
    assert width > 2 * height  # one wide panel per row, not a tall canvas of margins
    square = plot_images(_sky(SHAPES["square"]))
    width, height = square.get_size_inches()
    assert 0.9 < width / height < 1.6  # 2 x 2 grid of square maps with colour bars
