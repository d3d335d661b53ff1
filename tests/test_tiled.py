"""Tiled iterations (cwtflow.tiled) equal the in-memory engine for any chunking: every variable
to 1e-10 relative, identical support, same iterations and convergence."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback
from dask.utils import key_split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cwtflow
from cwtflow import CWT, CWTKernels
from cwtflow.maps import default_wcs
from cwtflow.state import STATE_VARS, initial_state
from cwtflow.tiled import TiledStep

KERNELS = CWTKernels(n_scale=2, min_scale=1.0, step_scale=1.5)  # halo 9 pixels
SMALL_KERNELS = [
    CWTKernels(1, 1.0, 1.5),  # halo 6
    KERNELS,
    CWTKernels(2, 1.2, 1.3),  # halo 8
    CWTKernels(3, 0.8, 1.4),  # halo 9
    CWTKernels(2, 1.0, 2.0),  # halo 16
]


def sky(
    seed: int,
    shape: tuple[int, int],
    sources: list[tuple[float, float]],
    *,
    wrap: bool = False,
) -> xr.Dataset:
    """Poisson counts over a smooth positive background with a bright source at each of
    ``sources`` (y, x); an all-sky CAR grid (periodic sources) with ``wrap``."""
    rng = np.random.default_rng(seed)
    nx = shape[1]
    y, x = np.indices(shape, dtype=np.float64)
    background = 0.7 + 0.3 * np.sin(x / 6.0 + rng.uniform(0, 6)) * np.cos(y / 4.0) ** 2
    rate = background.copy()
    for sy, sx in sources:
        dx = (x - sx + nx / 2) % nx - nx / 2 if wrap else x - sx
        flux = rng.uniform(30.0, 80.0)
        rate += flux * np.exp(-((y - sy) ** 2 + dx**2) / (2 * 1.3**2)) / (2 * np.pi * 1.3**2)
    counts = rng.poisson(rate).astype(np.float64)
    wcs = default_wcs(shape, binsz=360.0 / nx if wrap else 0.1)
    return cwtflow.make_maps(counts, background, wcs)


def assert_same_run(tiled: xr.Dataset, memory: xr.Dataset) -> None:
    """Every state variable to 1e-10 relative (of its largest value), identical support, same
    iterations, convergence and variances."""
    for name in STATE_VARS:
        actual = np.asarray(tiled[name].values)
        expected = np.asarray(memory[name].values)
        assert actual.shape == expected.shape, name
        if name == "support":
            np.testing.assert_array_equal(actual, expected, err_msg=name)
        else:
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10 * scale, err_msg=name)
    assert tiled.attrs["iterations"] == memory.attrs["iterations"]
    assert tiled.attrs["converged"] == memory.attrs["converged"]
    np.testing.assert_allclose(
        tiled.attrs["residual_variance"], memory.attrs["residual_variance"], rtol=1e-12
    )


def compare(data: xr.Dataset, chunks, kernels: CWTKernels = KERNELS, **options) -> xr.Dataset:
    """Run in memory and tiled (``chunks=`` or an already chunked Dataset); check they agree."""
    options = {"max_iter": 3, **options}
    memory = CWT(kernels, **options).analyze(data)
    if isinstance(chunks, dict) and any(isinstance(v, tuple) for v in chunks.values()):
        tiled = CWT(kernels, **options).analyze(data.chunk(chunks))
    else:
        tiled = CWT(kernels, **options).analyze(data, chunks=chunks)
    assert all(isinstance(tiled[name].data, da.Array) for name in STATE_VARS)
    assert_same_run(tiled, memory)
    return tiled


# --- explicit cases --------------------------------------------------------------------------

CHUNKINGS = {
    "smaller-than-halo": (6, 7),
    "uneven": {"y": (10, 3, 17, 10), "x": (25, 6, 1, 24)},
    "single": (40, 56),
    "one-row-of-tiles": (40, 11),
    "one-column-of-tiles": (7, 56),
    "halo-sized": (9, 9),
}
OPTIONS = {
    "island": {"significance_island_threshold": 4.5},
    "island-keep-isolated": {"significance_island_threshold": 4.0, "remove_isolated": False},
    "no-cleaning": {"remove_isolated": False},
}
SOURCES = [(10.0, 12.0), (20.0, 30.0), (33.0, 50.0), (5.0, 45.0)]


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_tiled_equals_in_memory(chunks) -> None:
    compare(sky(1, (40, 56), SOURCES), chunks)


@pytest.mark.parametrize("chunks", ["uneven", "halo-sized"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_cleaning_options(chunks, options) -> None:
    compare(sky(1, (40, 56), SOURCES), CHUNKINGS[chunks], **options)


def test_sources_on_tile_corners() -> None:
    # every interior corner of the 12 x 16 tiles carries a source
    corners = [(float(y), float(x)) for y in (12, 24, 36) for x in (16, 32, 48)]
    data = sky(2, (48, 64), corners)
    tiled = compare(data, (12, 16), significance_island_threshold=5.0, max_iter=4)
    support_2d = tiled["support"].values.any(axis=0)
    assert all(support_2d[int(y), int(x)] for y, x in corners)


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [((30, 48), (7, 13)), ((30, 48), (30, 48)), ((24, 12), (5, 12)), ((24, 12), (24, 12))],
    ids=["tiles", "single", "narrow-one-tile-x", "narrow-single"],
)
def test_allsky_wrap(shape, chunks) -> None:
    # a source on the seam; "narrow" maps are fewer pixels wide than the halo (16)
    data = sky(3, shape, [(shape[0] / 2, -0.5), (4.0, shape[1] / 3)], wrap=True)
    kernels = CWTKernels(2, 1.0, 2.0)
    assert CWT(kernels).wraps(data) and kernels.halo > 12
    tiled = compare(data, chunks, kernels, significance_island_threshold=4.0)
    row = int(shape[0] / 2)
    assert tiled["support"].values.any(axis=0)[row, [0, -1]].all()


def test_result_keeps_input_chunks_and_history() -> None:
    data = sky(4, (40, 56), [(20.0, 20.0)])
    chunks = {"y": (10, 3, 27), "x": (30, 26)}
    cwt = CWT(KERNELS, max_iter=2, keep_history=True)
    state = cwt.analyze(data.chunk(chunks))
    for name in STATE_VARS:
        dims = state[name].dims
        expected = [(state.sizes["scale"],) if d == "scale" else chunks[d] for d in dims]
        assert state[name].data.chunks == tuple(expected), name
    memory = CWT(KERNELS, max_iter=2, keep_history=True)
    memory.analyze(data)
    assert len(cwt.history) == len(memory.history) == 3
    for tiled_step, memory_step in zip(cwt.history[1:], memory.history[1:], strict=True):
        for name in ("model", "transform_3d", "support"):
            expected = memory_step[name].values
            np.testing.assert_allclose(
                tiled_step[name].values, expected, rtol=0, atol=1e-10 * np.abs(expected).max()
            )


# --- property-based ------------------------------------------------------------------------


@st.composite
def tiled_runs(draw):
    ny, nx = draw(st.integers(6, 48)), draw(st.integers(6, 64))
    cuts_y = draw(st.lists(st.integers(1, ny - 1), max_size=4, unique=True))
    cuts_x = draw(st.lists(st.integers(1, nx - 1), max_size=4, unique=True))
    chunks = {
        dim: tuple(np.diff(sorted({0, n, *cuts})).tolist())
        for dim, n, cuts in (("y", ny, cuts_y), ("x", nx, cuts_x))
    }
    # sources on tile corners (and a free one)
    sources = [(float(y), float(x)) for y in cuts_y[:2] for x in cuts_x[:2]]
    sources.append((draw(st.floats(0, ny - 1)), draw(st.floats(0, nx - 1))))
    options = {
        "significance_threshold": draw(st.floats(2.0, 4.0)),
        "significance_island_threshold": draw(st.none() | st.floats(3.0, 8.0)),
        "remove_isolated": draw(st.booleans()),
        "tol": draw(st.sampled_from([1e-5, 1e-2])),
    }
    return {
        "shape": (ny, nx),
        "chunks": chunks,
        "sources": sources,
        "wrap": draw(st.booleans()),
        "kernels": draw(st.sampled_from(SMALL_KERNELS)),
        "seed": draw(st.integers(0, 2**16)),
        "options": options,
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=tiled_runs())
@pytest.mark.slow
def test_tiled_equals_in_memory_property(run) -> None:
    data = sky(run["seed"], run["shape"], run["sources"], wrap=run["wrap"])
    compare(data, run["chunks"], run["kernels"], **run["options"])


# --- geometry helpers ----------------------------------------------------------------------


# --- laziness and graph structure ----------------------------------------------------------


class Recorder(Callback):
    """Counts computations and records the largest array each kind of task returns."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0
        self.largest: dict[str, int] = {}

    def _start(self, dsk) -> None:
        self.starts += 1

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        name = key_split(key)
        self.largest[name] = max(self.largest.get(name, 0), _nbytes(result))


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return sum(_nbytes(item) for item in obj.ravel())
        return obj.nbytes
    if isinstance(obj, tuple | list):
        return sum(_nbytes(item) for item in obj)
    return 0


def test_building_a_step_computes_nothing() -> None:
    cwt = CWT(KERNELS, significance_island_threshold=4.0)
    data = cwtflow.validate_maps(sky(5, (40, 56), [(20.0, 28.0)])).chunk({"y": 8, "x": 14})
    recorder = Recorder()

    def refuse(*args, **kwargs):
        raise AssertionError("a computation was started while building the graph")

    with recorder, dask.config.set(scheduler=refuse):
        step = TiledStep(cwt.settings, data, False)
        state = initial_state(data, KERNELS)
        for _ in range(2):  # a second step on the lazy first one: still nothing computed
            state, moments = step(state)
    assert recorder.starts == 0
    assert all(isinstance(state[name].data, da.Array) for name in STATE_VARS)
    tiles = tuple(len(axis) for axis in step.work_chunks)  # 8-pixel rows merged to the halo
    assert isinstance(moments, da.Array) and moments.shape == (*tiles, 4) == (2, 4, 4)
    with recorder:
        dask.compute(state, moments)
    assert recorder.starts == 1


def test_no_task_gathers_the_map() -> None:
    data = cwtflow.validate_maps(sky(6, (96, 160), [(30.0, 40.0), (70.0, 120.0)]))
    data = data.chunk({"y": 24, "x": 32})
    cwt = CWT(KERNELS, significance_island_threshold=4.0)
    step = TiledStep(cwt.settings, data, False)
    (state,) = dask.persist(initial_state(data, KERNELS))
    state, _ = step(state)
    (state,) = dask.persist(state)  # a state with support and a model, like any later step
    recorder = Recorder()
    with recorder:
        dask.persist(*step(state))
    assert recorder.starts == 1
    joining = {k: v for k, v in recorder.largest.items() if "join" in k or "finalize" in k}
    per_tile = {k: v for k, v in recorder.largest.items() if k not in joining}
    tile = 24 * 32 * 8
    image = 96 * 160 * 8
    # the widest per-tile result: the tile's interior planes T, E, significance (per scale), A
    assert max(per_tile.values()) <= (3 * KERNELS.n_scale + 1) * tile < image, per_tile
    assert max(joining.values()) <= image / 8, joining


@pytest.mark.parametrize("island", [None, 4.0])
def test_each_tile_is_convolved_once_per_iteration(island, monkeypatch) -> None:
    calls = []
    convolve_step = cwtflow.core.convolve_step

    def counting(*args, **kwargs):
        calls.append(1)
        return convolve_step(*args, **kwargs)

    monkeypatch.setattr(cwtflow.core, "convolve_step", counting)
    data = sky(7, (40, 56), [(20.0, 28.0)])
    state = CWT(KERNELS, max_iter=2, tol=0, significance_island_threshold=island).analyze(
        data, chunks=(20, 14)
    )
    assert state.attrs["iterations"] == 2
    assert len(calls) == 2 * 2 * 4
