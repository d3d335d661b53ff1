"""Resume after SIGKILL: a real subprocess writing a store is killed at chosen moments, then the
run is resumed and must end identical to an uninterrupted run.

The child pauses itself at the chosen moment through monkeypatches that exist only in the child
script below (production code has no test hooks): it writes a flag file and sleeps, and the
test kills it with SIGKILL once the flag appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import random_arrays

import cwtflow
from cwtflow.history import open_history
from cwtflow.state import STATE_VARS
from cwtflow.store import COMPLETE

SHAPE = (36, 44)
pytestmark = pytest.mark.slow  # every test here spawns and kills real processes

SEED = 11
KERNELS = cwtflow.CWTKernels(2, 2.0, 2.0)

CHILD = textwrap.dedent(
    """
    import json, shutil, sys, time
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])
    from helpers import random_arrays
    from zarr.storage import LocalStore

    import cwtflow
    import cwtflow.store_writer as history

    spec = json.loads(sys.argv[2])
    store, flag, point, k = Path(spec["store"]), Path(spec["flag"]), spec["point"], spec["k"]

    def pause():
        flag.write_text("paused")
        time.sleep(600)

    original_set = LocalStore.set
    written = []

    async def set_and_maybe_pause(self, key, value):
        await original_set(self, key, value)
        if key.startswith(spec["prefix"]) and "/c/" in key:
            written.append(key)
            if len(written) == spec["after_chunks"]:
                pause()

    original_seal = history.ZarrSink._seal  # marks a written iteration complete

    def seal(self, j, *args):
        if point == "before_mark" and j == k:
            pause()
        original_seal(self, j, *args)
        if point == "after_complete" and j == k:
            pause()

    original_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if point == "mid_prune" and Path(path).name.startswith(f".deleted-{k - 1:04d}-"):
            pause()
        return original_rmtree(path, *args, **kwargs)

    if point == "mid_write":
        LocalStore.set = set_and_maybe_pause
    history.ZarrSink._seal = seal
    shutil.rmtree = rmtree  # the stores' group deletion (cwtflow.store.delete_group)

    if spec["cli"]:
        from cwtflow.cli import main

        main(spec["cli"])
    counts, background = random_arrays(spec["seed"], tuple(spec["shape"]))
    data = cwtflow.make_maps(counts, background)
    cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 2.0, 2.0), **spec["options"])
    cwt.analyze(data, store=store, chunks=spec["chunks"])
    print("finished without pausing")
    """
)


def options(keep: bool) -> dict:
    return {"max_iter": 4, "tol": 0.0, "keep_history": keep}


@pytest.fixture(scope="module")
def maps():
    return cwtflow.make_maps(*random_arrays(SEED, SHAPE))


@pytest.fixture(scope="module")
def uninterrupted(maps):
    cwt = cwtflow.CWT(KERNELS, **options(True))
    final = cwt.analyze(maps)
    return final, cwt.history


def run_and_kill(tmp_path: Path, point: str, k: int, *, keep: bool = True, **spec) -> Path:
    """Run the child until it pauses at ``point`` (iteration ``k``), SIGKILL it, return the
    store."""
    store, flag = tmp_path / "run.zarr", tmp_path / "paused.flag"
    spec = {
        "store": str(store),
        "flag": str(flag),
        "point": point,
        "k": k,
        "prefix": spec.get("prefix", ""),
        "after_chunks": spec.get("after_chunks", 0),
        "seed": SEED,
        "shape": list(SHAPE),
        "options": options(keep),
        "chunks": spec.get("chunks"),
        "cli": [str(a) for a in spec.get("cli", [])],
    }
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, tests_dir, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"child ended before pausing at {point}:\n{out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"child did not reach {point} in time")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return store


def marked(store: Path) -> dict[str, bool]:
    """{iteration directory: marked complete} as left on disk."""
    out = {}
    for entry in sorted((store / "iterations").iterdir()):
        if entry.is_dir():
            try:
                attrs = zarr.open_group(str(entry), mode="r").attrs
                out[entry.name] = attrs.get(COMPLETE) is True
            except FileNotFoundError:
                out[entry.name] = False
    return out


def resume_and_compare(
    store: Path, maps, uninterrupted, *, keep: bool = True, chunks=None, rtol: float = 0.0
) -> list:
    """Resume ``store``; the result must equal the uninterrupted run (bit for bit, or to
    ``rtol`` relative for tiled runs). Returns the iterations run by the resumed call."""
    final, states = uninterrupted
    cwt = cwtflow.CWT(KERNELS, **options(keep))
    seen = []
    result = cwt.analyze(maps, store=store, resume=True, callback=seen.append, chunks=chunks)
    for name in STATE_VARS:
        expected, got = final[name].values, result[name].values
        if rtol and expected.dtype != bool:
            atol = rtol * float(np.abs(expected).max())
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)
    variances = final.attrs["residual_variance"]
    assert result.attrs["residual_variance"] == pytest.approx(variances, rel=rtol)
    history = open_history(store)
    assert list(history.table()["residual_variance"]) == result.attrs["residual_variance"]
    assert history.status == "max_iter reached"
    if keep:
        assert history.iterations == [0, 1, 2, 3, 4]
        for k in (1, 3):
            got = history.state(k)["model"].values
            np.testing.assert_allclose(got, states[k]["model"], rtol=rtol, atol=rtol * 100)
    else:
        assert history.iterations == [4]
    return seen


def test_kill_after_iteration_complete(tmp_path, maps, uninterrupted):
    store = run_and_kill(tmp_path, "after_complete", 2)
    assert marked(store) == {"0000": True, "0001": True, "0002": True}
    seen = resume_and_compare(store, maps, uninterrupted)
    assert [i.iteration for i in seen] == [3, 4]


def test_kill_while_writing_an_iteration(tmp_path, maps, uninterrupted):
    store = run_and_kill(tmp_path, "mid_write", 3, prefix="iterations/0003/", after_chunks=3)
    assert marked(store) == {"0000": True, "0001": True, "0002": True, "0003": False}
    assert open_history(store).iterations == [0, 1, 2]  # readers ignore the partial group
    seen = resume_and_compare(store, maps, uninterrupted)
    assert [i.iteration for i in seen] == [3, 4]


def test_kill_before_marking_complete(tmp_path, maps, uninterrupted):
    store = run_and_kill(tmp_path, "before_mark", 1)
    assert marked(store) == {"0000": True, "0001": False}
    resume_and_compare(store, maps, uninterrupted)


def test_kill_while_writing_inputs(tmp_path, maps, uninterrupted):
    store = run_and_kill(tmp_path, "mid_write", 0, prefix="inputs/", after_chunks=2)
    inputs = zarr.open_group(str(store), path="inputs", mode="r")
    assert COMPLETE not in inputs.attrs
    with pytest.raises(cwtflow.StoreError, match="no complete inputs"):
        open_history(store)
    resume_and_compare(store, maps, uninterrupted)


def test_kill_while_pruning_without_history(tmp_path, maps, uninterrupted):
    """keep_history=False: killed after iteration 3 is complete, while deleting iteration 2
    (unmarked and moved out of the hierarchy first): the newest good iteration survives, the
    run resumes from it and removes the leftover."""
    store = run_and_kill(tmp_path, "mid_prune", 3, keep=False)
    (leftover,) = (store / "iterations").glob(".deleted-0002-*")
    assert marked(store) == {leftover.name: False, "0003": True}
    assert open_history(store).iterations == [3]
    seen = resume_and_compare(store, maps, uninterrupted, keep=False)
    assert [i.iteration for i in seen] == [4]
    assert not leftover.exists()


def test_cli_run_killed_then_resumed(tmp_path):
    """``cwtflow run --out run.zarr`` killed mid-iteration, then ``cwtflow run --resume``."""
    from click.testing import CliRunner

    from cwtflow.cli import cli
    from cwtflow.io import read_maps, write_maps

    maps_file = write_maps(cwtflow.make_maps(*random_arrays(SEED, SHAPE)), tmp_path / "m.fits")
    store = tmp_path / "run.zarr"
    args = ["run", str(maps_file), "--out", str(store), "--max-iter", "4", "--tol", "0", "-q"]
    args += ["--n-scale", "2", "--min-scale", "2", "--step-scale", "2"]
    run_and_kill(tmp_path, "mid_write", 3, prefix="iterations/0003/", after_chunks=2, cli=args)
    assert marked(store) == {"0002": True, "0003": False}
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        f"cwtflow: error: output store exists: {store} (use --resume to continue it or "
        "--overwrite to replace it)"
    )
    resumed = CliRunner().invoke(cli, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.startswith(f"wrote {store} (4 iterations, not converged")
    expected = cwtflow.CWT(KERNELS, max_iter=4, tol=0.0).analyze(read_maps(maps_file))
    result = cwtflow.read_result(store)
    for name in STATE_VARS:
        np.testing.assert_array_equal(result[name].values, expected[name].values, err_msg=name)
    assert result.attrs["residual_variance"] == expected.attrs["residual_variance"]
    info = CliRunner().invoke(cli, ["info", str(store)])
    assert info.exit_code == 0, info.output
    assert "Iterations (run: 4, converged: no)" in info.stdout


def test_tiled_run_killed_mid_write_then_resumed(tmp_path, maps, uninterrupted):
    """chunks=: killed with some tiles of iteration 2 written, resumed tiled again."""
    store = run_and_kill(
        tmp_path, "mid_write", 2, prefix="iterations/0002/", after_chunks=10, chunks=[16, 20]
    )
    assert marked(store) == {"0000": True, "0001": True, "0002": False}
    assert zarr.open_group(str(store), mode="r").attrs["chunks"] == [16, 20]
    seen = resume_and_compare(store, maps, uninterrupted, chunks=(16, 20), rtol=1e-10)
    assert [i.iteration for i in seen] == [2, 3, 4]
