"""The zarr history store: layout, crash-safety markers, lazy reading, refusals, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from dask.callbacks import Callback
from helpers import random_arrays

import cwtflow
from cwtflow.core import combine_moments, residual_moments
from cwtflow.history import open_history, read_result
from cwtflow.maps import default_wcs
from cwtflow.state import STATE_VARS, VARIABLES, initial_state
from cwtflow.store import COMPLETE
from cwtflow.store_writer import ZarrSink

KERNELS = cwtflow.CWTKernels(2, 2.0, 2.0)


def make_cwt(**kwargs) -> cwtflow.CWT:
    options = {"max_iter": 4, "tol": 0.0, "keep_history": True, **kwargs}
    return cwtflow.CWT(KERNELS, **options)


def assert_same_state(a: xr.Dataset, b: xr.Dataset, *, rtol: float = 0.0) -> None:
    for name in STATE_VARS:
        x, y = a[name].values, b[name].values
        assert x.dtype == y.dtype, name
        if rtol == 0.0 or x.dtype == bool:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            atol = rtol * float(np.abs(y).max())  # values near 0: relative to the array's scale
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


def forbid_compute(dsk, keys, **kwargs):
    raise AssertionError("a dask computation was started")


def iteration_attrs(path: Path, k: int) -> dict:
    return dict(zarr.open_group(str(path), path=f"iterations/{k:04d}", mode="r").attrs)


def is_marked(path: Path, k: int) -> bool:
    return iteration_attrs(path, k).get(COMPLETE) is True


def unmark(path: Path, k: int) -> None:
    """Make iteration ``k`` look like a group a killed run left behind (data, no marker)."""
    group = zarr.open_group(str(path), path=f"iterations/{k:04d}", mode="r+")
    attrs = dict(group.attrs)
    del attrs[COMPLETE]
    group.attrs.put(attrs)


@pytest.fixture
def maps(random_maps) -> xr.Dataset:
    return random_maps(3, (36, 44))


@pytest.fixture
def reference(maps):
    """In-memory run (keep_history) of `make_cwt` on `maps`: (final state, history)."""
    cwt = make_cwt()
    final = cwt.analyze(maps)
    return final, cwt.history


# --- writing ----------------------------------------------------------------------------------


def test_store_run_equals_in_memory_run(tmp_path, maps, reference):
    cwt = make_cwt()
    result = cwt.analyze(maps, store=tmp_path / "run.zarr")
    final, history = reference
    assert result["model"].chunks is not None  # backed by the store, lazily
    assert_same_state(result, final)
    assert result.attrs["residual_variance"] == final.attrs["residual_variance"]
    assert len(cwt.history) == len(history) == 5
    for stored, kept in zip(cwt.history, history, strict=True):
        assert_same_state(stored, kept)


def test_in_memory_iterations_are_written_behind_the_compute(
    tmp_path, maps, reference, monkeypatch
):
    """The in-memory engine's iterations are written by a background thread, each after the
    previous one is sealed, and the next iteration starts from the planes in memory: nothing
    is read back but the initial state and the result."""
    import cwtflow.store_writer as writer

    path, writes, opened = tmp_path / "run.zarr", [], []
    write_region, open_state = writer.write_region, ZarrSink._open_state

    def logged_write(store, group, region, arrays):
        k = int(group[-4:])
        writes.append((k, threading.current_thread() is threading.main_thread()))
        assert is_marked(path, k - 1)
        write_region(store, group, region, arrays)

    def logged_open(self, k):
        opened.append(k)
        return open_state(self, k)

    monkeypatch.setattr(writer, "write_region", logged_write)
    monkeypatch.setattr(ZarrSink, "_open_state", logged_open)
    result = make_cwt(keep_history=False).analyze(maps, store=path)
    assert writes == [(k, False) for k in (1, 2, 3, 4)]
    assert opened == [0, 4]
    assert result["model"].chunks is not None  # the result is read from the store
    assert_same_state(result, reference[0])


def test_failing_compute_waits_for_the_background_write(tmp_path, maps, monkeypatch):
    """An error in the compute while an iteration is written in the background: the run
    raises it once that write has ended, and only then releases the store's lock."""
    import time

    import cwtflow.engine as engine
    import cwtflow.store_writer as writer

    path, ended, write_region = tmp_path / "run.zarr", [], writer.write_region
    step = engine._InMemoryStep.__call__

    def slow_write(store, group, region, arrays):
        time.sleep(0.5)
        write_region(store, group, region, arrays)
        ended.append((group, (path / "cwtflow.lock").exists()))

    def failing_step(self, state):
        if state.attrs.get("iteration") == 1:
            raise RuntimeError("compute failed")
        return step(self, state)

    monkeypatch.setattr(writer, "write_region", slow_write)
    monkeypatch.setattr(engine._InMemoryStep, "__call__", failing_step)
    with pytest.raises(RuntimeError, match="compute failed"):
        make_cwt().analyze(maps, store=path)
    assert ended == [("iterations/0001", True)]  # written while the lock was held
    assert not (path / "cwtflow.lock").exists()
    assert is_marked(path, 1)
    assert open_history(path).iterations == [0, 1]


def test_failed_background_write_is_never_sealed(tmp_path, maps, reference, monkeypatch):
    """A write that fails in the background raises from the run, leaves its group unmarked
    and the lock released; resuming ends as an uninterrupted run."""
    import cwtflow.store_writer as writer

    original = writer.write_region

    def write_region(path, group, region, arrays):
        if group == "iterations/0002":
            raise OSError(28, "No space left on device")
        original(path, group, region, arrays)

    monkeypatch.setattr(writer, "write_region", write_region)
    path = tmp_path / "run.zarr"
    with pytest.raises(OSError, match="No space left"):
        make_cwt().analyze(maps, store=path)
    assert open_history(path).iterations == [0, 1]
    assert not is_marked(path, 2)
    monkeypatch.setattr(writer, "write_region", original)
    result = make_cwt().analyze(maps, store=path, resume=True)  # the lock was released
    assert_same_state(result, reference[0])
    assert open_history(path).iterations == [0, 1, 2, 3, 4]


def test_layout_and_attrs(tmp_path, random_maps):
    data = random_maps(5, (30, 40))
    data["exposure"] = data["counts"] * 0 + 3e10
    data["exposure"].attrs = {"units": "cm2 s", "long_name": "exposure"}
    cwt = make_cwt(max_iter=3)
    path = tmp_path / "run.zarr"
    cwt.analyze(data, store=path)
    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    assert attrs["format"] == "cwtflow-history"
    assert attrs["cwtflow_version"] == cwtflow.__version__
    assert attrs["parameters"] == json.loads(json.dumps(cwt.parameters()))
    assert attrs["kernels"] == [list(r) for r in KERNELS.info_table().iterrows()]
    assert attrs["shape"] == [30, 40]
    assert attrs["chunks"] == [30, 40]  # numpy input: one chunk up to 1024 x 1024
    assert attrs["status"] == "max_iter reached"
    assert attrs["wcs"] == data.attrs["wcs"]
    assert attrs["variables"]["support"] == {
        "dims": ["scale", "y", "x"],
        "units": VARIABLES["support"][1],
        "long_name": VARIABLES["support"][2],
    }
    assert attrs["variables"]["exposure"]["units"] == "cm2 s"
    inputs = root["inputs"]
    assert sorted(inputs.array_keys()) == ["background", "counts", "exposure", "lat", "lon"]
    assert inputs.attrs[COMPLETE] is True
    assert sorted(root["iterations"].group_keys()) == ["0000", "0001", "0002", "0003"]
    for k in range(4):
        group = root[f"iterations/{k:04d}"]
        assert group.attrs[COMPLETE] is True and group.attrs["iteration"] == k
        stored = [n for n in STATE_VARS if n not in ("counts", "background")]
        assert sorted(group.array_keys()) == sorted(["scale", "lon", "lat", *stored])
        assert group.attrs["wcs"] == attrs["wcs"]  # each group carries its sky grid
        model = group["transform_3d"]
        assert model.metadata.dimension_names == ("scale", "y", "x")
        assert model.attrs["units"] == "count"
    last = iteration_attrs(path, 3)
    assert [row["iteration"] for row in last["table"]] == [1, 2, 3]
    assert last["variance_ratio"] == last["table"][2]["variance_ratio"]
    assert set(last) >= {"residual_variance", "variance_ratio", "converged", "support_size"}


def test_keep_history_false_keeps_newest_only(tmp_path, maps, reference):
    cwt = make_cwt(keep_history=False)
    path = tmp_path / "run.zarr"
    result = cwt.analyze(maps, store=path)
    assert cwt.history == []
    assert sorted(p.name for p in (path / "iterations").iterdir() if p.is_dir()) == ["0004"]
    history = open_history(path)
    assert history.iterations == [4]
    assert list(history.table()["iteration"]) == [1, 2, 3, 4]
    assert_same_state(result, reference[0])
    assert_same_state(history.final, reference[0])


def test_resume_clears_what_a_killed_deletion_left(tmp_path, maps, reference):
    """A group is deleted by moving it out of the hierarchy, then removing it; a kill during
    the removal leaves that directory, which the next writer removes."""
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2, keep_history=False).analyze(maps, store=path)
    shutil.copytree(path / "iterations" / "0002", path / "iterations" / ".deleted-0001-abc")
    (path / ".deleted-catalog-abc").mkdir()
    result = make_cwt(keep_history=False).analyze(maps, store=path, resume=True)
    assert sorted(p.name for p in (path / "iterations").iterdir() if p.is_dir()) == ["0004"]
    assert not (path / ".deleted-catalog-abc").exists()
    assert_same_state(result, reference[0], rtol=1e-12)


def test_converged_run_status(tmp_path, maps):
    cwt = make_cwt(max_iter=30, tol=1e-2)
    path = tmp_path / "run.zarr"
    result = cwt.analyze(maps, store=path)
    assert result.attrs["converged"]
    history = open_history(path)
    assert history.status == "converged"
    assert history.table()["converged"][-1]


# --- reading lazily -----------------------------------------------------------------------------


def test_open_history_is_lazy_and_right(tmp_path, maps, reference):
    path = tmp_path / "run.zarr"
    make_cwt().analyze(maps, store=path)
    final, states = reference
    with dask.config.set(scheduler=forbid_compute):
        history = open_history(path)
        assert history.iterations == [0, 1, 2, 3, 4]
        state2 = history.state(2)
        diff = history.difference(4, 1)
        stacked = history.stack("residual")
        cube = history.stack("support", [1, 3])
        imgs = cwtflow.images(history.state(3))
        tree = history.to_datatree()
        table = history.table()
        result = read_result(path)
    assert_same_state(state2, states[2])
    assert_same_state(result, final)
    assert result.attrs["iterations"] == 4
    assert result.attrs["residual_variance"] == final.attrs["residual_variance"]
    np.testing.assert_array_equal(diff["model"], states[4]["model"] - states[1]["model"])
    np.testing.assert_array_equal(diff["support"], states[4]["support"] ^ states[1]["support"])
    assert stacked.dims == ("iteration", "y", "x")
    assert list(stacked["iteration"].values) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(
        stacked.sel(iteration=3), cwtflow.images(states[3])["residual"].values
    )
    assert cube.sizes == {"iteration": 2, "scale": 2, "y": 36, "x": 44}
    np.testing.assert_array_equal(cube.sel(iteration=3), states[3]["support"])
    np.testing.assert_array_equal(imgs["maximal"], cwtflow.images(states[3])["maximal"])
    np.testing.assert_array_equal(tree["iterations/0004"]["model"], final["model"])
    assert list(table["residual_variance"]) == final.attrs["residual_variance"]
    assert np.isnan(table["variance_ratio"][0])
    metrics = cwtflow.state_metrics(history.state(3))
    expected = cwtflow.state_metrics(states[3])
    for col in ("Variance", "Mean", "Max value", "Min value", "Sum values"):
        np.testing.assert_array_equal(metrics[col], expected[col])


def test_readers_ignore_unmarked_groups(tmp_path, maps):
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=3).analyze(maps, store=path)
    unmark(path, 3)
    history = open_history(path)
    assert history.iterations == [0, 1, 2]
    assert history.final.attrs["iterations"] == 2
    with pytest.raises(KeyError, match="iteration 3"):
        history.state(3)


def test_open_history_refuses_non_stores(tmp_path):
    with pytest.raises(cwtflow.StoreError, match="not a zarr store"):
        open_history(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", attributes={"a": 1})
    with pytest.raises(cwtflow.StoreError, match="not a cwtflow history store"):
        open_history(tmp_path / "plain.zarr")


# --- the sink on dask-backed states -------------------------------------------------------------


@pytest.mark.slow
def test_sink_writes_dask_state_in_one_compute(tmp_path, maps, reference):
    """Lazy inputs: store chunks are the tiles, one compute writes an iteration and its
    moments, and the state read back has a graph of loads only (it does not grow with the
    iterations)."""
    lazy = cwtflow.validate_maps(maps.chunk({"y": 16, "x": 20}))
    cwt = make_cwt()
    sink = ZarrSink(tmp_path / "run.zarr", cwt.settings, lazy)
    state, done = sink.start(initial_state(lazy, KERNELS))
    assert done == []
    assert state["model"].chunks == ((16, 16, 4), (20, 20, 4))
    computes = []

    def counting(dsk, keys, **kwargs):
        computes.append(keys)
        return dask.get(dsk, keys, **kwargs)

    sizes = []
    for k, ref in enumerate(reference[1][1:], start=1):
        new = ref.chunk({"y": 12, "x": 11})  # other tiles: the sink rechunks to the store's
        moments = residual_moments(
            *(ref[n].values for n in ("counts", "model", "approx")), ref["support"].values
        )
        with dask.config.set(scheduler=counting):
            state, moments = sink.write(k, new, da.from_array(moments))
        assert len(computes) == k
        variance, support_size = combine_moments(moments)
        assert variance == pytest.approx(reference[0].attrs["residual_variance"][k - 1], rel=1e-12)
        assert support_size == int(ref["support"].any("scale").sum())
        info = cwtflow.IterationInfo(k, variance, np.nan, False, 0)
        state = sink.complete(k, state, info)
        sizes.append(len(dict(state.__dask_graph__())))
        assert state["transform_3d"].chunks == ((2,), (16, 16, 4), (20, 20, 4))
    assert len(set(sizes)) == 1
    root = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")
    assert root["inputs/counts"].chunks == (16, 20)
    assert root["iterations/0003/error"].chunks == (2, 16, 20)
    assert_same_state(state, reference[1][-1])


# --- existing stores ----------------------------------------------------------------------------


@pytest.mark.slow
def test_existing_store_needs_resume_or_overwrite(tmp_path, maps, reference):
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2).analyze(maps, store=path)
    with pytest.raises(cwtflow.StoreError, match="already exists"):
        make_cwt().analyze(maps, store=path)
    with pytest.raises(cwtflow.InputError, match="exclude"):
        make_cwt().analyze(maps, store=path, resume=True, overwrite=True)
    with pytest.raises(cwtflow.InputError, match="needs a store"):
        make_cwt().analyze(maps, resume=True)
    result = make_cwt().analyze(maps, store=path, overwrite=True)
    assert_same_state(result, reference[0])
    assert open_history(path).iterations == [0, 1, 2, 3, 4]


def test_overwrite_refuses_foreign_paths(tmp_path, maps):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(cwtflow.StoreError, match="not a zarr store"):
        make_cwt().analyze(maps, store=other, overwrite=True)
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", attributes={"x": 1})
    with pytest.raises(cwtflow.StoreError, match="not a cwtflow history store"):
        make_cwt().analyze(maps, store=tmp_path / "foreign.zarr", overwrite=True)
    afile = tmp_path / "run.fits"
    afile.write_bytes(b"x")
    with pytest.raises(cwtflow.StoreError, match="not a directory"):
        make_cwt().analyze(maps, store=afile, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"
    assert afile.read_bytes() == b"x"


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [True, False])
def test_resume_after_max_iter_raised_and_leftover_group(tmp_path, maps, reference, keep):
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2, keep_history=keep).analyze(maps, store=path)
    # A leftover of a run killed while writing iteration 3: metadata, some arrays, no marker.
    shutil.copytree(path / "iterations" / "0002", path / "iterations" / "0003")
    shutil.rmtree(path / "iterations" / "0003" / "error")
    unmark(path, 3)
    assert open_history(path).iterations == ([0, 1, 2] if keep else [2])
    seen = []
    cwt = make_cwt(keep_history=keep)
    result = cwt.analyze(maps, store=path, resume=True, callback=seen.append)
    assert [i.iteration for i in seen] == [3, 4]
    assert_same_state(result, reference[0])
    assert result.attrs["residual_variance"] == reference[0].attrs["residual_variance"]
    history = open_history(path)
    assert history.iterations == ([0, 1, 2, 3, 4] if keep else [4])
    assert history.table()["residual_variance"].tolist() == result.attrs["residual_variance"]


def test_resume_of_finished_run_does_nothing(tmp_path, maps, reference):
    path = tmp_path / "run.zarr"
    make_cwt().analyze(maps, store=path)
    seen = []
    result = make_cwt().analyze(maps, store=path, resume=True, callback=seen.append)
    assert seen == []
    assert_same_state(result, reference[0])
    with pytest.raises(cwtflow.StoreError, match="more than max_iter"):
        make_cwt(max_iter=3).analyze(maps, store=path, resume=True)


def test_resume_of_missing_store_starts_fresh(tmp_path, maps, reference):
    result = make_cwt().analyze(maps, store=tmp_path / "new.zarr", resume=True)
    assert_same_state(result, reference[0])


def _edit_root(path: Path, **changes) -> None:
    root = zarr.open_group(str(path), mode="r+")
    attrs = dict(root.attrs)
    for key, value in changes.items():
        if value is None:
            del attrs[key]
        else:
            attrs[key] = value
    root.attrs.put(attrs)


def _other_counts(maps):
    out = maps.copy(deep=True)
    out["counts"][5, 7] += 1
    return out


def _shifted_wcs(maps):
    out = maps.copy()
    out.attrs = {**maps.attrs, "wcs": {**maps.attrs["wcs"], "CRVAL1": 10.0}}
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, m: (make_cwt(tol=1e-3), m), "other parameters.*tol"),
        (lambda p, m: (make_cwt(keep_history=False), m), "other parameters.*keep_history"),
        (lambda p, m: (make_cwt(), _other_counts(m)), "other input maps: 'counts'"),
        (lambda p, m: (make_cwt(), m.isel(x=slice(0, 40))), "shape"),
        (lambda p, m: (make_cwt(), _shifted_wcs(m)), "another WCS"),
        (lambda p, m: _edit_root(p, cwtflow_version="0.0.1"), "written by cwtflow 0.0.1"),
        (lambda p, m: _edit_root(p, format_version=99), "format version 99"),
        (lambda p, m: _edit_root(p, shape=None), "root attrs lack shape"),
        (lambda p, m: _edit_root(p, chunks=[0, 3]), "bad root attr 'chunks'"),
        (lambda p, m: shutil.rmtree(p / "iterations" / "0002" / "error"), "lacks 'error'"),
        (lambda p, m: shutil.rmtree(p / "inputs" / "background"), "lacks 'background'"),
        (
            lambda p, m: zarr.open_group(str(p), path="iterations/0002", mode="r+").attrs.update(
                {"table": [{"iteration": 1}]}
            ),
            "bad attrs of iteration 2",
        ),
        (lambda p, m: (p / "zarr.json").write_text("{not json"), "cannot read"),
    ],
)
def test_resume_refuses_other_or_corrupted_stores(tmp_path, maps, change, message):
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2).analyze(maps, store=path)
    changed = change(path, maps)
    cwt, data = changed if isinstance(changed, tuple) else (make_cwt(), maps)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    with pytest.raises(cwtflow.StoreError, match=message):
        cwt.analyze(data, store=path, resume=True)
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before  # nothing touched


def test_open_history_refuses_corrupted_store(tmp_path, maps):
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2).analyze(maps, store=path)
    shutil.rmtree(path / "iterations" / "0001" / "model")
    with pytest.raises(cwtflow.StoreError, match="iterations/0001' lacks 'model'"):
        open_history(path)


# --- downstream tools ---------------------------------------------------------------------------

PLAIN_ZARR_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import zarr
    from astropy.io import fits
    from astropy.wcs import WCS

    root = zarr.open_group(sys.argv[1], mode="r")
    attrs = root.attrs.asdict()
    wcs = WCS(fits.Header(attrs["wcs"]))
    arrays = {}
    for path in ["inputs/counts", "inputs/lon", "iterations/0002/model",
                 "iterations/0002/support"]:
        a = root[path]
        arrays[path] = {
            "dims": list(a.metadata.dimension_names),
            "units": a.attrs.get("units"),
            "long_name": a.attrs.get("long_name"),
            "sum": float(np.asarray(a[...], dtype=float).sum()),
        }
    done = sorted(k for k, g in root["iterations"].groups() if g.attrs.get("cwtflow_complete"))
    print(json.dumps({
        "arrays": arrays,
        "done": done,
        "table": root["iterations/0002"].attrs["table"],
        "wcs_header": dict(wcs.to_header()),
        "shape": attrs["shape"],
        "modules": sorted(m for m in ("xarray", "cwtflow") if m in sys.modules),
    }))
    """
)


@pytest.mark.slow
def test_store_reads_with_plain_zarr_and_astropy(tmp_path, maps, reference):
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2).analyze(maps, store=path)
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_ZARR_READER, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out = json.loads(proc.stdout)
    assert out["modules"] == []
    assert out["done"] == ["0000", "0001", "0002"]
    assert out["shape"] == [36, 44]
    model = out["arrays"]["iterations/0002/model"]
    assert model["dims"] == ["y", "x"]
    assert (model["units"], model["long_name"]) == VARIABLES["model"][1:]
    assert model["sum"] == pytest.approx(float(reference[1][2]["model"].sum()), rel=1e-12)
    support = out["arrays"]["iterations/0002/support"]
    assert support["dims"] == ["scale", "y", "x"]
    assert support["long_name"] == VARIABLES["support"][2]
    assert out["arrays"]["inputs/counts"]["sum"] == float(maps["counts"].sum())
    assert out["arrays"]["inputs/lon"]["units"] == "deg"
    assert [row["iteration"] for row in out["table"]] == [1, 2]
    from astropy.io import fits
    from astropy.wcs import WCS

    rebuilt = WCS(fits.Header(out["wcs_header"]))
    assert rebuilt.wcs.compare(cwtflow.wcs_from_attrs(maps.attrs).wcs)


def test_input_checksum_does_not_depend_on_tiles(tmp_path, maps):
    """A store written from numpy maps resumes from the same maps in any dask chunking (the
    checksum runs on the store's chunk grid) and still refuses a changed pixel."""
    path = tmp_path / "run.zarr"
    make_cwt(max_iter=2).analyze(maps, store=path)
    lazy = cwtflow.validate_maps(maps.chunk({"y": 7, "x": 9}))
    sink = ZarrSink(path, make_cwt().settings, lazy, resume=True)
    state, done = sink.start(initial_state(lazy, KERNELS))
    assert [info.iteration for info in done] == [1, 2]
    assert sink.chunks == (36, 44)
    assert state.attrs["iteration"] == 2
    changed = lazy.copy()
    changed["background"] = lazy["background"] + xr.where(
        (lazy["y"] == 30) & (lazy["x"] == 40), 1e-12, 0.0
    )
    sink = ZarrSink(path, make_cwt().settings, changed, resume=True)
    with pytest.raises(cwtflow.StoreError, match="'background' differs"):
        sink.start(initial_state(changed, KERNELS))


# --- tiled runs through the store ---------------------------------------------------------------


@pytest.mark.slow
def test_tiled_run_through_store(tmp_path, maps, reference):
    """chunks=: zarr chunks are the tiles, the result equals the in-memory run, and every
    iteration is one computation of one task per tile (read from the store, computed and
    written in the task), the same every iteration (states are read back from the store)."""

    path = tmp_path / "run.zarr"
    cwt = make_cwt()
    graphs = TileGraphs()
    with graphs:
        result = cwt.analyze(maps, chunks=(16, 20), store=path)
    assert_same_state(result, reference[0], rtol=1e-10)
    assert result["model"].chunks == ((16, 16, 4), (20, 20, 4))
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["chunks"] == [16, 20]
    assert root["inputs/counts"].chunks == (16, 20)
    assert root["iterations/0004/transform_3d"].chunks == (2, 16, 20)
    # 4 iterations, each a graph of one task: the kernels' halo is wider than the chunks,
    # so the whole map is one work tile (see the next test for many)
    assert graphs.sizes == [(1, 1)] * 4
    for stored, kept in zip(cwt.history, reference[1], strict=True):
        assert_same_state(stored, kept, rtol=1e-10)
    # resuming the tiled store from numpy maps (or other tiles) continues it
    resumed = make_cwt(max_iter=5).analyze(maps, store=path, resume=True)
    expected = make_cwt(max_iter=5).analyze(maps)
    assert_same_state(resumed, expected, rtol=1e-10)


class TileGraphs(Callback):
    """Records (tasks, tile tasks) of every computation that writes tiles to a store."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def _start(self, dsk) -> None:
        tiles = sum(str(key).startswith("store-tile-") for key in dsk)
        if tiles:
            self.sizes.append((len(dsk), tiles))


@pytest.mark.parametrize(
    ("wrap", "shape", "tiles"),
    [pytest.param(False, (45, 44), 20, marks=pytest.mark.slow), (True, (20, 44), 8)],
)
def test_store_iterations_are_one_task_per_tile(tmp_path, wrap, shape, tiles):
    """Independent tiles (no island threshold): an iteration is one task per tile, which
    reads its windows from the store, and the stored history equals the in-memory run's
    (an all-sky map too: the windows wrap in longitude)."""
    counts, background = random_arrays(5, shape)
    wcs = default_wcs(shape, binsz=360.0 / shape[1] if wrap else 0.1)
    maps = cwtflow.make_maps(counts, background, wcs)
    small = cwtflow.CWTKernels(1, 1.0, 2.0)  # halo 8 (+1 for the cleaning): tiles of 9 x 11
    cwt = cwtflow.CWT(small, max_iter=3, tol=0.0, keep_history=True)
    assert cwt.wraps(maps) == wrap
    expected = cwt.analyze(maps, store=tmp_path / "memory.zarr")  # written through xarray
    expected_history = cwt.history
    graphs = TileGraphs()
    with graphs:
        result = cwt.analyze(maps, chunks=(9, 11), store=tmp_path / "run.zarr")
    assert graphs.sizes == [(tiles, tiles)] * 3  # nothing but the tile tasks in the graph
    assert_same_state(result, expected, rtol=1e-10)
    for stored, kept in zip(cwt.history, expected_history, strict=True):
        assert_same_state(stored, kept, rtol=1e-10)
    # groups 1.. of both runs are laid out by copying the previous group's metadata: the same
    # arrays and metadata (chunks apart) as xarray wrote for iteration 0, the same attrs
    arrays, _ = group_layout(tmp_path / "memory.zarr", 0)
    del arrays["attrs"]
    for k in range(1, 4):
        tiled, chunks = group_layout(tmp_path / "run.zarr", k)
        memory, _ = group_layout(tmp_path / "memory.zarr", k)
        assert tiled == memory == {**arrays, "attrs": memory["attrs"]}
        assert chunks["model"] == [9, 11] and chunks["support"] == [1, 9, 11]


def group_layout(path: Path, k: int) -> tuple[dict, dict]:
    """Every array's metadata in iteration group ``k`` but its chunk shape, with the group's
    attrs (their names, iteration and sky grid: the rest are statistics); the chunk shapes."""
    group = path / "iterations" / f"{k:04d}"
    attrs = iteration_attrs(path, k)
    layout: dict = {"attrs": [sorted(attrs), attrs["iteration"], attrs["wcs"]]}
    chunks = {}
    for meta in group.glob("*/zarr.json"):
        doc = json.loads(meta.read_text())
        chunks[meta.parent.name] = doc.pop("chunk_grid")["configuration"]["chunk_shape"]
        layout[meta.parent.name] = doc
    return layout, chunks


@pytest.mark.parametrize(
    ("wrap", "shape", "tiles"),
    [pytest.param(False, (45, 44), 20, marks=pytest.mark.slow), (True, (20, 44), 8)],
)
def test_store_iterations_with_island_threshold_take_four_tasks_per_tile(
    tmp_path, wrap, shape, tiles
):
    """With an island threshold the components are joined across tiles: per tile a first
    pass (planes kept on the worker, labels reported), two getitems, one join for the whole
    map, then the tile's writing task; the history equals the in-memory run's."""
    counts, background = random_arrays(5, shape)
    wcs = default_wcs(shape, binsz=360.0 / shape[1] if wrap else 0.1)
    maps = cwtflow.make_maps(counts, background, wcs)
    small = cwtflow.CWTKernels(1, 1.0, 2.0)
    options = {"max_iter": 3, "tol": 0.0, "keep_history": True}
    cwt = cwtflow.CWT(small, significance_island_threshold=4.0, **options)
    expected = cwt.analyze(maps)
    expected_history = cwt.history
    plain = cwtflow.CWT(small, **options).analyze(maps)
    assert not np.array_equal(plain["support"], expected["support"])  # the threshold matters
    graphs = TileGraphs()
    with graphs:
        result = cwt.analyze(maps, chunks=(9, 11), store=tmp_path / "run.zarr")
    assert graphs.sizes == [(4 * tiles + 1, tiles)] * 3
    assert_same_state(result, expected, rtol=1e-10)
    for stored, kept in zip(cwt.history, expected_history, strict=True):
        assert_same_state(stored, kept, rtol=1e-10)


@pytest.mark.slow
def test_resume_with_tiles_across_store_chunks(tmp_path):
    """Resumed with tiles whose edges are not chunk edges of the store, an iteration is not
    written tile by tile (two tasks would share chunks) but through one graph: same result."""
    maps = cwtflow.make_maps(*random_arrays(8, (45, 44)))
    kernels = cwtflow.CWTKernels(1, 1.0, 2.0)
    path = tmp_path / "run.zarr"
    cwtflow.CWT(kernels, max_iter=1, tol=0.0).analyze(maps, chunks=(9, 11), store=path)
    graphs = TileGraphs()
    with graphs:
        resumed = cwtflow.CWT(kernels, max_iter=3, tol=0.0).analyze(
            maps, chunks=(10, 10), store=path, resume=True
        )
    assert graphs.sizes == []
    expected = cwtflow.CWT(kernels, max_iter=3, tol=0.0).analyze(maps)
    assert_same_state(resumed, expected, rtol=1e-10)


@pytest.mark.slow
def test_cli_run_into_store(tmp_path, maps, reference):
    """``cwtflow run --out run.zarr --chunks NY NX`` writes the tiled history store; --resume
    needs a .zarr output."""
    from click.testing import CliRunner

    from cwtflow.cli import cli
    from cwtflow.io import write_maps

    maps_file = write_maps(maps, tmp_path / "maps.fits")
    store = tmp_path / "run.zarr"
    args = ["run", str(maps_file), "--n-scale", "2", "--min-scale", "2", "--step-scale", "2"]
    args += ["--max-iter", "4", "--tol", "0", "-q"]
    result = CliRunner().invoke(cli, [*args, "--out", str(store), "--chunks", "16", "20"])
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(store), mode="r").attrs["chunks"] == [16, 20]
    assert_same_state(read_result(store), reference[0], rtol=1e-10)
    refused = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "r.fits"), "--resume"])
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        "cwtflow: error: --resume needs a zarr store output (--out run.zarr)"
    )
    assert not (tmp_path / "r.fits").exists()
