"""All-sky CAR maps wrap in longitude: periodic convolutions and support components across the
seam, the same in memory and tiled; partial maps keep the reference (zero) boundary."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

import cwtflow
from cwtflow import CWT, CWTKernels, InputError
from cwtflow.maps import default_wcs
from cwtflow.state import STATE_VARS

KERNELS = CWTKernels(n_scale=2, min_scale=1.0, step_scale=2.0)  # halo 16 pixels
SHAPE = (48, 120)
SOURCE_Y = 24.0


def sky(binsz: float, *, seed: int = 7, source_x: float = -0.5) -> xr.Dataset:
    """Poisson sky of ``SHAPE`` pixels of ``binsz`` deg with one bright source at ``source_x``.

    The source is placed periodically in x (its image wraps around the x axis), so with the
    default ``source_x=-0.5`` it is centred on the seam between the last and the first column.
    """
    nx = SHAPE[1]
    y, x = np.indices(SHAPE, dtype=np.float64)
    dx = (x - source_x + nx / 2) % nx - nx / 2
    sigma = 1.6
    source = (
        150.0 * np.exp(-((y - SOURCE_Y) ** 2 + dx**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    )
    background = 0.8 + 0.3 * np.cos(2 * np.pi * x / nx) * np.sin(y / 9.0) ** 2
    counts = np.random.default_rng(seed).poisson(background + source).astype(np.float64)
    return cwtflow.make_maps(counts, background, default_wcs(SHAPE, binsz=binsz))


def rolled(data: xr.Dataset, shift: int) -> xr.Dataset:
    """The same sky with its pixels rolled by ``shift`` columns (same WCS: still all-sky)."""
    return cwtflow.make_maps(
        np.roll(data["counts"].values, shift, axis=1),
        np.roll(data["background"].values, shift, axis=1),
        default_wcs(SHAPE, binsz=360.0 / SHAPE[1]),
    )


def assert_states_equal(actual: xr.Dataset, expected: xr.Dataset) -> None:
    """Every state variable equal to 1e-10 relative (of its largest value), support identical."""
    for name in STATE_VARS:
        a = np.asarray(actual[name].values)
        e = np.asarray(expected[name].values)
        if name == "support":
            np.testing.assert_array_equal(a, e, err_msg=name)
        else:
            scale = max(float(np.abs(e).max()), 1e-300)
            np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10 * scale, err_msg=name)


def components(mask: np.ndarray, *, wrap_x: bool) -> np.ndarray:
    """4-connected labels of ``mask``, joined across the x seam when ``wrap_x``."""
    labels, _ = ndimage.label(mask)
    if wrap_x:
        for left, right in zip(labels[:, 0], labels[:, -1], strict=True):
            if left and right and left != right:
                labels[labels == right] = left
    return labels


def source_components(state: xr.Dataset, *, wrap_x: bool) -> set[int]:
    """Labels of the 2-D support components touching the source's core (r <= 2 px)."""
    support_2d = state["support"].values.any(axis=0)
    labels = components(support_2d, wrap_x=wrap_x)
    y, x = np.indices(SHAPE)
    dx = (x + 0.5 + SHAPE[1] / 2) % SHAPE[1] - SHAPE[1] / 2
    core = (y - SOURCE_Y) ** 2 + dx**2 <= 4
    return set(np.unique(labels[core & support_2d]).tolist())


def run(data: xr.Dataset, *, chunks: tuple[int, int] | None = None, **kwargs) -> xr.Dataset:
    state = CWT(KERNELS, max_iter=3, **kwargs).analyze(data, chunks=chunks)
    return state.compute()


ALLSKY_BINSZ = 360.0 / SHAPE[1]
CHUNKINGS = [None, (16, 40), (20, 13)]  # in memory; tiles smaller than the halo; uneven tiles


@pytest.fixture(scope="module")
def allsky() -> xr.Dataset:
    return sky(ALLSKY_BINSZ)


@pytest.fixture(scope="module")
def reference(allsky: xr.Dataset) -> xr.Dataset:
    """In-memory result on the all-sky map (wrap decided by ``wrap_lon=None``)."""
    return run(allsky)


def test_allsky_map_wraps(allsky: xr.Dataset) -> None:
    assert cwtflow.maps.is_allsky(default_wcs(SHAPE, binsz=ALLSKY_BINSZ), SHAPE)
    assert CWT(KERNELS).wraps(allsky)
    assert not CWT(KERNELS, wrap_lon=False).wraps(allsky)


def test_source_on_seam_is_one_component(reference: xr.Dataset, allsky: xr.Dataset) -> None:
    support_2d = reference["support"].values.any(axis=0)
    # the source straddles the seam: supported on both edge columns, as one component
    assert support_2d[int(SOURCE_Y), 0] and support_2d[int(SOURCE_Y), -1]
    assert len(source_components(reference, wrap_x=True)) == 1
    # with the reference zero boundary the same source falls apart into two halves
    unwrapped = run(allsky, wrap_lon=False)
    assert len(source_components(unwrapped, wrap_x=False)) == 2


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=["memory", "tiles16x40", "tiles20x13"])
def test_rolled_sky_gives_rolled_result(
    chunks: tuple[int, int] | None, reference: xr.Dataset, allsky: xr.Dataset
) -> None:
    shift = SHAPE[1] // 2
    back = run(rolled(allsky, shift), chunks=chunks).roll(x=-shift, roll_coords=False)
    assert_states_equal(back, reference)
    assert len(source_components(back, wrap_x=True)) == 1


@pytest.mark.parametrize("chunks", CHUNKINGS[1:], ids=["tiles16x40", "tiles20x13"])
def test_tiled_allsky_equals_in_memory(
    chunks: tuple[int, int], reference: xr.Dataset, allsky: xr.Dataset
) -> None:
    assert_states_equal(run(allsky, chunks=chunks), reference)


def test_partial_map_unaffected_by_wrap_lon_none() -> None:
    data = sky(2.0)  # 240 deg of longitude
    assert not cwtflow.maps.is_allsky(default_wcs(SHAPE, binsz=2.0), SHAPE)
    assert not CWT(KERNELS).wraps(data)
    assert_states_equal(run(data), run(data, wrap_lon=False))
    # and the zero boundary really is in force: the seam source is two components there
    assert len(source_components(run(data), wrap_x=False)) == 2


def test_wrap_lon_true_on_partial_map_raises() -> None:
    data = sky(2.0)
    with pytest.raises(InputError, match="360 deg"):
        CWT(KERNELS, wrap_lon=True).analyze(data)
