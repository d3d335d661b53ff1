"""The tile-by-tile iteration of a store (cwtflow.store_tiles): its chunk cache and the windows
read through it (the runs themselves are tested in test_history.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import cwtflow
from cwtflow import store_tiles
from cwtflow.halo import window
from cwtflow.store_tiles import ChunkCache


def test_cache_keeps_recent_blocks_within_its_bytes() -> None:
    cache = ChunkCache(3 * 800)  # three blocks of 100 float64
    loads: list[int] = []

    def loader(i: int):
        def load() -> np.ndarray:
            loads.append(i)
            return np.full(100, float(i))

        return load

    for i in (0, 1, 2, 0, 3):  # 0 used again before 3 arrives: 1 is the oldest and goes
        block = cache.get(("a", i), loader(i))
        assert block[0] == i and not block.flags.writeable
    assert loads == [0, 1, 2, 3]
    cache.get(("a", 1), loader(1))
    assert loads == [0, 1, 2, 3, 1]
    cache.get(("a", 0), loader(0))  # still kept: loading 1 again evicted 2, the oldest
    assert loads == [0, 1, 2, 3, 1]
    big = ChunkCache(10)
    big.get(("b",), lambda: np.zeros(100))  # larger than the cache: returned, not kept
    assert big.get(("b",), lambda: np.ones(100))[0] == 1.0


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.tuples(st.integers(3, 9), st.integers(3, 9)),
    start=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    size=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    depth=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    periodic=st.booleans(),
)
def test_windows_read_through_the_cache_equal_the_array(
    tmp_path_factory, chunks, start, size, depth, periodic
) -> None:
    image = np.random.default_rng(sum(chunks)).normal(size=(29, 31))
    path = tmp_path_factory.mktemp("cache") / "a.zarr"
    stored = zarr.create_array(str(path), shape=image.shape, chunks=chunks, dtype="f8")
    stored[...] = image
    store_tiles.CACHE.clear()
    cached = store_tiles.CachedArray(stored, (str(path), "digest", "a"))
    rows = slice(start[0], min(start[0] + size[0], 29))
    cols = slice(start[1], min(start[1] + size[1], 31))
    for _ in range(2):  # from the arrays, then from the cache
        np.testing.assert_array_equal(
            window(cached, rows, cols, depth, periodic), window(image, rows, cols, depth, periodic)
        )


@pytest.mark.parametrize(
    ("chunks", "n_chunks"), [pytest.param((9, 11), 5 * 4, marks=pytest.mark.slow), (None, 1)]
)
def test_constant_plane_is_written_once(tmp_path: Path, chunks, n_chunks) -> None:
    """approx_bkg, constant after iteration 1, is the same files in every later group (hard
    links): written once, checksums and manifests intact, values equal; by the tile tasks and
    by the in-memory engine's writes."""
    from helpers import random_arrays

    maps = cwtflow.make_maps(*random_arrays(3, (45, 44)))
    cwt = cwtflow.CWT(cwtflow.CWTKernels(1, 1.0, 2.0), max_iter=3, tol=0.0, keep_history=True)
    cwt.analyze(maps, chunks=chunks, store=tmp_path / "run.zarr")
    groups = [tmp_path / "run.zarr" / "iterations" / f"000{k}" / "approx_bkg" for k in (1, 2, 3)]
    files = sorted(p.relative_to(groups[0]) for p in groups[0].rglob("c/*/*"))
    assert len(files) == n_chunks
    for name in files:
        inodes = {(g / name).stat().st_ino for g in groups}
        assert len(inodes) == 1
    report = cwtflow.verify_store(tmp_path / "run.zarr")  # raises on any damage
    assert len(report.groups) == 5  # inputs and iterations 0-3
    history = cwtflow.open_history(tmp_path / "run.zarr")
    np.testing.assert_array_equal(history[1]["approx_bkg"], history[3]["approx_bkg"])


def test_opened_arrays_are_reused_only_while_their_metadata_is_unchanged(tmp_path: Path) -> None:
    """`cwtflow.store.open_array` (the tile tasks' opens): the same array object while its
    metadata file is unchanged, a fresh one once the array was replaced at the same path."""
    from cwtflow.store import open_array

    path = tmp_path / "s.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("g/a", shape=(4, 4), chunks=(2, 2), dtype="f8")[...] = 1.0
    first = open_array(path, "g/a")
    assert open_array(path, "g/a") is first
    root["g/a"][0, 0] = 5.0  # new chunk data: the same array reads it
    assert open_array(path, "g/a")[0, 0] == 5.0
    root.create_array("g/a", shape=(6, 3), chunks=(3, 3), dtype="i4", overwrite=True)[...] = 7
    again = open_array(path, "g/a")
    assert again is not first and again.shape == (6, 3)
    np.testing.assert_array_equal(again[...], np.full((6, 3), 7))


def _logged_writes(monkeypatch, fail: str | None = None) -> list[tuple[str, str]]:
    """(group, writing thread's name) of every final tile write; ``fail``: that group's
    first write raises."""
    writes: list[tuple[str, str]] = []
    original = store_tiles.write_region

    def write_region(path, group, region, arrays):
        if group == fail and not any(g == fail for g, _ in writes):
            writes.append((group, "failed"))
            raise OSError(28, "No space left on device")
        original(path, group, region, arrays)
        writes.append((group, threading.current_thread().name))  # once written

    monkeypatch.setattr(store_tiles, "write_region", write_region)
    return writes


def test_local_tile_tasks_write_behind_and_the_iteration_waits(tmp_path, monkeypatch) -> None:
    """On dask's threads a tile's write goes to the writer thread; every write of an iteration
    ends before its group is sealed (the result equals the in-memory run's)."""
    from helpers import random_arrays

    maps = cwtflow.make_maps(*random_arrays(5, (90, 88)))
    writes = _logged_writes(monkeypatch)
    cwt = cwtflow.CWT(cwtflow.CWTKernels(1, 1.0, 2.0), max_iter=3, tol=0.0)
    sealed = []

    def seal(info):
        group = f"iterations/{info.iteration:04d}"
        tiles = [w for w in writes if w[0] == group]
        sealed.append((len(tiles), cwtflow.open_history(tmp_path / "run.zarr").iterations))

    result = cwt.analyze(maps, chunks=(30, 44), store=tmp_path / "run.zarr", callback=seal)
    assert {name for _, name in writes} == {"cwtflow-tiles_0"}
    assert sealed == [(6, [1]), (6, [2]), (6, [3])]  # 3 x 2 tiles written, then sealed
    expected = cwtflow.CWT(cwtflow.CWTKernels(1, 1.0, 2.0), max_iter=3, tol=0.0).analyze(maps)
    np.testing.assert_allclose(result["model"].values, expected["model"].values, atol=1e-12)
    np.testing.assert_array_equal(result["support"].values, expected["support"].values)


def test_cluster_tile_tasks_write_in_their_task(tmp_path, monkeypatch) -> None:
    """A worker writes its tiles in the task itself (never behind it)."""
    from distributed import Client, LocalCluster
    from helpers import random_arrays

    maps = cwtflow.make_maps(*random_arrays(5, (90, 88)))
    writes = _logged_writes(monkeypatch)  # the workers are threads of this process here
    cwt = cwtflow.CWT(cwtflow.CWTKernels(1, 1.0, 2.0), max_iter=2, tol=0.0)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            cwt.analyze(maps, chunks=(30, 44), store=tmp_path / "run.zarr", client=client)
    assert len(writes) == 12
    assert not any(name.startswith("cwtflow-tiles") for _, name in writes)


def test_failed_tile_write_is_raised_and_never_sealed(tmp_path, monkeypatch) -> None:
    from helpers import random_arrays

    maps = cwtflow.make_maps(*random_arrays(5, (90, 88)))
    writes = _logged_writes(monkeypatch, fail="iterations/0002")
    cwt = cwtflow.CWT(cwtflow.CWTKernels(1, 1.0, 2.0), max_iter=3, tol=0.0)
    with pytest.raises(OSError, match="No space left"):
        cwt.analyze(maps, chunks=(30, 44), store=tmp_path / "run.zarr")
    assert ("iterations/0002", "failed") in writes
    assert cwtflow.open_history(tmp_path / "run.zarr").iterations == [1]
    assert not any(t.name.startswith("cwtflow-tiles") for t in threading.enumerate())
