"""Plot helper: a grid of sky images (WCSAxes), saved as a valid PNG."""

from __future__ import annotations

import matplotlib.image
import pytest
from astropy.visualization.wcsaxes import WCSAxes
from helpers import random_arrays

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


def test_grid_of_all_images_saved_as_png(tmp_path, state):
    path = tmp_path / "state.png"
    fig = plot_images(state, path, dpi=40)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == list(IMAGES)
    assert all(len(ax.get_images()) == 1 for ax in axes)
    assert len(fig.axes) == 2 * len(IMAGES)  # one colour bar per panel
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
