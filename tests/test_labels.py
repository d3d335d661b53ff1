"""Connected components across dask tiles (cwtflow.labels) against scipy brute force, for many
chunkings, components crossing several tiles and the periodic seam; and no task gathers the map.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from dask.utils import key_split
from helpers import clean_tiled, clean_whole_map
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cwtflow import InputError
from cwtflow.labels import label_components

# --- brute force --------------------------------------------------------------------------


def brute_labels(mask: np.ndarray, *, wrap_x: bool) -> np.ndarray:
    """Components of every (y, x) plane: a pixel graph with 4-neighbour (and seam) edges."""
    mask = np.asarray(mask, dtype=bool)
    index = np.arange(mask.size).reshape(mask.shape)
    pairs = [
        (index[..., :-1, :], index[..., 1:, :], mask[..., :-1, :] & mask[..., 1:, :]),
        (index[..., :, :-1], index[..., :, 1:], mask[..., :, :-1] & mask[..., :, 1:]),
    ]
    if wrap_x:
        pairs.append((index[..., :, -1], index[..., :, 0], mask[..., :, -1] & mask[..., :, 0]))
    rows = np.concatenate([a[m] for a, _, m in pairs])
    cols = np.concatenate([b[m] for _, b, m in pairs])
    graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(mask.size, mask.size))
    _, component = connected_components(graph, directed=False)
    labels = np.zeros(mask.size, dtype=np.intp)
    _, labels[mask.ravel()] = np.unique(component[mask.ravel()], return_inverse=True)
    labels[mask.ravel()] += 1
    return labels.reshape(mask.shape)


def assert_same_partition(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same background, and a one-to-one correspondence between the labels of both."""
    np.testing.assert_array_equal(actual == 0, expected == 0)
    pairs = np.unique(np.stack([actual[expected > 0], expected[expected > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
    # labels are consecutive from 1
    assert set(np.unique(actual[actual > 0]).tolist()) == set(range(1, pairs.shape[1] + 1))


def chunked(array: np.ndarray, cuts: tuple[tuple[int, ...], tuple[int, ...]]) -> da.Array:
    """Dask array of ``array`` with (y, x) chunk sizes from cut positions; scale one chunk."""
    chunks = []
    for n, positions in zip(array.shape[-2:], cuts, strict=True):
        edges = sorted({0, n, *(p for p in positions if 0 < p < n)})
        chunks.append(tuple(np.diff(edges).tolist()))
    return da.from_array(
        array, chunks=((array.shape[0],) if array.ndim == 3 else ()) + tuple(chunks)
    )


def random_mask(seed: int, shape: tuple[int, ...], density: float) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


# --- labels and statistics ------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    ny=st.integers(1, 24),
    nx=st.integers(1, 30),
    n_scale=st.integers(1, 2),
    density=st.floats(0.05, 0.7),
    cuts_y=st.lists(st.integers(1, 23), max_size=4),
    cuts_x=st.lists(st.integers(1, 29), max_size=4),
    wrap_x=st.booleans(),
)
def test_labels_and_stats_match_brute_force(
    seed, ny, nx, n_scale, density, cuts_y, cuts_x, wrap_x
) -> None:
    mask = random_mask(seed, (n_scale, ny, nx), density)
    values = np.random.default_rng(seed + 1).normal(size=mask.shape)
    labels, sizes, maxima = dask.compute(
        *label_components(
            chunked(mask, (cuts_y, cuts_x)), chunked(values, (cuts_y, cuts_x)), wrap_x=wrap_x
        )
    )
    expected = brute_labels(mask, wrap_x=wrap_x)
    assert_same_partition(labels, expected)
    n = int(expected.max())
    assert sizes.shape == maxima.shape == (n + 1,)
    assert sizes[0] == 0 and maxima[0] == -np.inf
    for label in range(1, n + 1):
        pixels = labels == label
        assert sizes[label] == pixels.sum()
        assert maxima[label] == values[pixels].max()


def test_image_labels_and_stats_without_values() -> None:
    mask = random_mask(3, (20, 25), 0.5)
    labels, sizes, maxima = dask.compute(*label_components(da.from_array(mask, chunks=(6, 7))))
    assert_same_partition(labels, brute_labels(mask, wrap_x=False))
    assert sizes[0] == 0
    np.testing.assert_array_equal(sizes[1:], np.bincount(labels.ravel())[1:])
    assert np.all(maxima == -np.inf)


def spiral(n: int) -> np.ndarray:
    """Nested square rings of width 1, each joined to the next: one winding component."""
    mask = np.zeros((n, n), dtype=bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        if bottom > top + 1:
            mask[bottom, left : right + 1] = True
        if right > left + 2:
            mask[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            mask[top - 1, left] = True
    return mask


@pytest.mark.parametrize(("n", "chunk"), [(15, 1), (37, 2), (37, 3), (37, 5), (37, 8), (37, 37)])
def test_component_crossing_many_tiles(n: int, chunk: int) -> None:
    mask = spiral(n)
    expected = brute_labels(mask, wrap_x=False)
    assert expected.max() == 1
    labels, sizes, _ = dask.compute(*label_components(da.from_array(mask, chunks=chunk)))
    assert_same_partition(labels, expected)
    assert sizes[1:].tolist() == np.bincount(expected.ravel())[1:].tolist()


@pytest.mark.parametrize("chunks", [(6, 40), (6, 7), (3, 13), (20, 1)])
def test_periodic_seam(chunks: tuple[int, int]) -> None:
    # a ring cut by the seam, a band that only closes across the seam, and an isolated pixel
    # on each edge column of one row (neighbours only across the seam)
    mask = np.zeros((20, 40), dtype=bool)
    mask[2, :] = True
    mask[5:9, :3] = mask[5:9, -3:] = True
    mask[12, 0] = mask[12, -1] = True
    mask[15, 0] = True
    for wrap_x in (False, True):
        labels, sizes, _ = dask.compute(
            *label_components(da.from_array(mask, chunks=chunks), wrap_x=wrap_x)
        )
        expected = brute_labels(mask, wrap_x=wrap_x)
        assert_same_partition(labels, expected)
        assert expected.max() == (4 if wrap_x else 6)
        assert labels[12, 0] == labels[12, -1] if wrap_x else labels[12, 0] != labels[12, -1]
        assert sorted(sizes[1:].tolist()) == sorted(np.bincount(expected.ravel())[1:].tolist())


def test_planes_never_join() -> None:
    mask = np.ones((3, 8, 9), dtype=bool)
    labels, sizes, _ = dask.compute(*label_components(da.from_array(mask, chunks=(1, 3, 4))))
    assert [len(np.unique(plane)) for plane in labels] == [1, 1, 1]
    assert len(np.unique(labels)) == 3
    assert sizes[1:].tolist() == [72, 72, 72]


def test_empty_mask() -> None:
    labels, sizes, maxima = dask.compute(
        *label_components(da.zeros((2, 10, 12), dtype=bool, chunks=(1, 4, 5)))
    )
    assert not labels.any()
    assert sizes.tolist() == [0] and maxima.tolist() == [-np.inf]


# --- support cleaning ----------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    ny=st.integers(1, 24),
    nx=st.integers(1, 30),
    cuts_y=st.lists(st.integers(1, 23), max_size=4),
    cuts_x=st.lists(st.integers(1, 29), max_size=4),
    threshold=st.floats(-0.5, 1.5),
    remove_isolated=st.booleans(),
    island_threshold=st.none() | st.floats(0.0, 3.0),
    wrap_x=st.booleans(),
)
def test_clean_support_matches_core(
    seed, ny, nx, cuts_y, cuts_x, threshold, remove_isolated, island_threshold, wrap_x
) -> None:
    sig = np.random.default_rng(seed).normal(size=(2, ny, nx)) * 1.5
    got = clean_tiled(
        chunked(sig, (cuts_y, cuts_x)),
        threshold,
        remove_isolated=remove_isolated,
        island_threshold=island_threshold,
        wrap_x=wrap_x,
    ).compute()
    options = {"remove_isolated": remove_isolated, "island_threshold": island_threshold}
    expected = np.stack([clean_whole_map(s, threshold, wrap_x=wrap_x, **options) for s in sig])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("wrap_x", [False, True])
@pytest.mark.parametrize("chunks", [(1, 4), (2, 3), (7, 40)])
def test_drop_isolated_equals_dropping_size_one_components(chunks, wrap_x) -> None:
    mask = random_mask(11, (14, 40), 0.3)
    mask[7, 0] = mask[7, -1] = True  # a pair joined only across the seam
    mask[6, [0, 1, -2, -1]] = mask[8, [0, 1, -2, -1]] = False
    mask[7, [1, -2]] = False
    sig = da.from_array(mask * 2.0, chunks=chunks)
    got = clean_tiled(sig, 1.0, remove_isolated=True, island_threshold=None, wrap_x=wrap_x)
    got = got.compute()
    labels = brute_labels(mask, wrap_x=wrap_x)
    expected = mask & (np.bincount(labels.ravel())[labels] != 1)
    np.testing.assert_array_equal(got, expected)
    assert got[7, 0] == wrap_x


def test_cleaning_keeps_component_whose_maximum_is_in_another_tile() -> None:
    # one component over four tiles; its only pixel above the island threshold is in one tile
    sig = np.zeros((1, 12, 12))
    sig[0, 2:10, 5:7] = 2.0
    sig[0, 3, 5] = 5.0
    sig[0, 9, 2] = 5.0  # a bright isolated pixel
    got = clean_tiled(
        da.from_array(sig, chunks=(1, 6, 6)), 1.0, remove_isolated=True, island_threshold=4.0
    ).compute()
    expected = np.zeros((12, 12), dtype=bool)
    expected[2:10, 5:7] = True
    np.testing.assert_array_equal(got[0], expected)


# --- graph structure -----------------------------------------------------------------------


class LargestResult(Callback):
    """Records how many computations start and the largest array each kind of task returns."""

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


def test_no_task_gathers_the_map_and_building_computes_nothing() -> None:
    # a smooth significance map: few, large components spread over many tiles
    noise = np.random.default_rng(5).normal(size=(2, 96, 160))
    sig = ndimage.gaussian_filter(noise, (0, 3, 3)) * 8.0
    # inputs persisted and results persisted (no final concatenation): no task of the
    # computation is handed the whole array by construction
    tiles = da.from_array(sig, chunks=(2, 24, 32)).persist()
    counter = LargestResult()
    with counter:
        kept = clean_tiled(tiles, 1.0, remove_isolated=True, island_threshold=2.5)
        labels, sizes, maxima = label_components(tiles > 1.0, tiles)
        assert counter.starts == 0
        kept, labels, sizes, maxima = dask.persist(kept, labels, sizes, maxima)
    assert counter.starts == 1
    joining = {k: v for k, v in counter.largest.items() if "join" in k or "finalize" in k}
    per_tile = {k: v for k, v in counter.largest.items() if k not in joining}
    assert joining and per_tile
    # per-tile tasks return at most one tile of the cube (float64 or intp); the joining tasks
    # get tile borders and label-indexed vectors, a small fraction of the map
    assert max(per_tile.values()) <= 2 * 24 * 32 * 8, per_tile
    assert max(joining.values()) <= sig.nbytes / 8, joining
    expected = np.stack(
        [clean_whole_map(s, 1.0, remove_isolated=True, island_threshold=2.5) for s in sig]
    )
    np.testing.assert_array_equal(kept.compute(), expected)
    assert_same_partition(labels.compute(), brute_labels(sig > 1.0, wrap_x=False))
    assert 5 < sizes.compute().size < 100


def test_bad_input() -> None:
    with pytest.raises(InputError, match="boolean"):
        label_components(da.zeros((4, 4), chunks=2))
    with pytest.raises(InputError, match="image"):
        clean_tiled(da.zeros((4,), chunks=2), 1.0, remove_isolated=True, island_threshold=None)
    with pytest.raises(InputError, match="shape"):
        label_components(da.zeros((4, 4), dtype=bool, chunks=2), da.zeros((4, 5), chunks=2))


def test_each_tile_is_labelled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    label = ndimage.label

    def counting_label(*args, **kwargs):
        calls.append(1)
        return label(*args, **kwargs)

    monkeypatch.setattr(ndimage, "label", counting_label)
    sig = da.from_array(np.random.default_rng(2).normal(size=(2, 30, 40)), chunks=(2, 10, 8))
    labels, sizes, maxima = label_components(sig > 1.0, sig)
    kept = clean_tiled(sig, 1.0, remove_isolated=True, island_threshold=2.0)
    dask.compute(labels, sizes, maxima, kept)
    assert len(calls) == sig.numblocks[1] * sig.numblocks[2]
