"""A store that cannot be silently corrupted: one writer at a time (the lock), checksummed
chunks and manifests (every tampering is a StoreError naming what), pinned readers (a group
pruned under a reader is an error telling to reopen, never fill values).

The process tests run real ``cwtflow`` processes on real stores; they pause themselves through
monkeypatches that exist only in the child script below (production code has no test hooks).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from click.testing import CliRunner
from helpers import random_arrays

import cwtflow
from cwtflow.cli import cli
from cwtflow.errors import StoreError
from cwtflow.history import open_history
from cwtflow.io import write_maps
from cwtflow.state import STATE_VARS
from cwtflow.store_lock import LOCK_NAME, StoreLock, read_lock

SEED = 5
SHAPE = (36, 44)
CHUNKS = (16, 20)  # a 3 x 3 grid of chunks
KERNELS = cwtflow.CWTKernels(2, 2.0, 2.0)


def make_cwt(max_iter: int = 2, keep: bool = True) -> cwtflow.CWT:
    return cwtflow.CWT(KERNELS, max_iter=max_iter, tol=0.0, keep_history=keep)


@pytest.fixture(scope="module")
def maps():
    return cwtflow.make_maps(*random_arrays(SEED, SHAPE))


@pytest.fixture(scope="module")
def reference(maps):
    """In-memory run of 8 iterations: (final state, every state)."""
    cwt = make_cwt(8)
    final = cwt.analyze(maps)
    return final, cwt.history


def assert_state_equals(got, expected, rtol: float = 1e-10) -> None:
    for name in STATE_VARS:
        a, b = np.asarray(got[name].values), np.asarray(expected[name].values)
        if b.dtype == bool:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


# --- tampering ------------------------------------------------------------------------------


def _delete_input_chunk(p: Path) -> None:
    (p / "inputs/counts/c/1/1").unlink()


def _flip_input_byte(p: Path) -> None:
    chunk = p / "inputs/counts/c/1/1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))


def _swap_model_chunks(p: Path) -> None:
    a, b = p / "iterations/0002/model/c/0/0", p / "iterations/0002/model/c/0/1"
    da, db = a.read_bytes(), b.read_bytes()
    assert da != db
    a.write_bytes(db)
    b.write_bytes(da)


def _truncate_chunk(p: Path) -> None:
    chunk = p / "iterations/0002/transform_3d/c/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _edit_zarr_json(file: Path, edit) -> None:
    doc = json.loads(file.read_text())
    edit(doc)
    file.write_text(json.dumps(doc))


def _garbage_wcs_card(p: Path) -> None:
    _edit_zarr_json(p / "zarr.json", lambda d: d["attributes"]["wcs"].update(CTYPE1=5))


def _changed_dtype(p: Path) -> None:
    _edit_zarr_json(p / "iterations/0002/model/zarr.json", lambda d: d.update(data_type="float32"))


def _edit_group_attrs(p: Path, **changes) -> None:
    group = zarr.open_group(str(p), path="iterations/0002", mode="r+")
    attrs = dict(group.attrs)
    attrs.update({k: f(attrs[k]) for k, f in changes.items()})
    group.attrs.put(attrs)


TAMPERING = {
    "deleted input chunk": (_delete_input_chunk, r"'inputs/counts'.*chunk c/1/1 is missing"),
    "flipped input byte": (_flip_input_byte, r"'inputs/counts'.*chunk c/1/1 fails its CRC32C"),
    "swapped model chunks": (
        _swap_model_chunks,
        r"'iterations/0002/model'.*chunk c/0/[01] is not the chunk the manifest lists",
    ),
    "truncated chunk": (
        _truncate_chunk,
        r"'iterations/0002/transform_3d'.*chunk c/0/0/0 fails its CRC32C",
    ),
    "garbage WCS card": (_garbage_wcs_card, r"corrupted store, bad root attrs"),
    "changed dtype": (
        _changed_dtype,
        r"'iterations/0002/model' has dtype 'float32', the manifest 'float64'",
    ),
    "edited converged": (
        lambda p: _edit_group_attrs(p, converged=lambda v: True),
        r"group 'iterations/0002'.*attrs were changed",
    ),
    "scaled residual_variance": (
        lambda p: _edit_group_attrs(p, residual_variance=lambda v: v * 2),
        r"group 'iterations/0002'.*attrs were changed",
    ),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, maps):
    """One intact two-iteration store; each tampering test edits its own copy."""
    path = tmp_path_factory.mktemp("pristine") / "run.zarr"
    make_cwt(2).analyze(maps, store=path, chunks=CHUNKS)
    assert cwtflow.verify_store(path).chunks > 0
    return path


@pytest.fixture
def tampered(tmp_path, pristine, request):
    path = tmp_path / "run.zarr"
    shutil.copytree(pristine, path)
    tamper, message = TAMPERING[request.param]
    tamper(path)
    return path, message


@pytest.mark.parametrize("tampered", list(TAMPERING), indirect=True)
def test_tampering_detected_by_reader(tampered):
    path, message = tampered
    with pytest.raises(StoreError, match=message):
        history = open_history(path)
        history.final.compute()


@pytest.mark.parametrize("tampered", list(TAMPERING), indirect=True)
@pytest.mark.slow
def test_tampering_detected_by_resume(tampered, maps):
    path, message = tampered
    with pytest.raises(StoreError, match=message):
        make_cwt(3).analyze(maps, store=path, chunks=CHUNKS, resume=True)
    assert not (path / LOCK_NAME).exists()  # released on the error


@pytest.mark.parametrize("tampered", list(TAMPERING), indirect=True)
@pytest.mark.slow
def test_tampering_detected_by_verify(tampered):
    path, message = tampered
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cwtflow: error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_verify_intact_store_and_empty_chunks_written(tmp_path, maps):
    path = tmp_path / "run.zarr"
    make_cwt(2).analyze(maps, store=path, chunks=CHUNKS)
    # support chunks that are all False (the fill value) are stored too
    assert len(list((path / "iterations/0000/support/c").rglob("*"))) >= 9
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{path}: intact: 4 complete groups (inputs, iterations/0000")


def test_reader_of_a_pruned_group_is_told_to_reopen(tmp_path, maps, reference):
    """keep_history=False: a History opened at iteration 2 reads nothing once the writer has
    moved on and pruned it; reopened, it reads the new newest iteration."""
    path = tmp_path / "run.zarr"
    make_cwt(2, keep=False).analyze(maps, store=path, chunks=CHUNKS)
    old = open_history(path)
    assert old.iterations == [2]
    make_cwt(3, keep=False).analyze(maps, store=path, chunks=CHUNKS, resume=True)
    with pytest.raises(StoreError, match=r"iteration 2 was pruned or replaced .* reopen"):
        old.state(2)["model"].compute()
    assert_state_equals(open_history(path).state(3), reference[1][3])


@pytest.mark.slow
def test_replaced_store_is_not_read_through_an_old_history(tmp_path, maps, random_maps):
    path = tmp_path / "run.zarr"
    make_cwt(2).analyze(maps, store=path, chunks=CHUNKS)
    old = open_history(path)
    make_cwt(2).analyze(random_maps(9, SHAPE), store=path, chunks=CHUNKS, overwrite=True)
    with pytest.raises(StoreError, match="reopen"):
        old.state(1)["model"].compute()


# --- the lock -------------------------------------------------------------------------------


def _write_lock(path: Path, **owner) -> None:
    path.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0}
    (path / LOCK_NAME).write_text(json.dumps({**base, "token": "x", **owner}))


def test_second_writer_is_refused_naming_the_owner(tmp_path, maps):
    path = tmp_path / "run.zarr"
    make_cwt(1).analyze(maps, store=path)
    with StoreLock(path) as lock:
        me = lock.owner
        with pytest.raises(
            StoreError, match=f"being written by another cwtflow process \\(pid {me.pid} on host"
        ):
            make_cwt(2).analyze(maps, store=path, resume=True)
        assert read_lock(path).token == me.token  # the refused writer left the lock alone
    assert not (path / LOCK_NAME).exists()
    make_cwt(2).analyze(maps, store=path, resume=True)


def test_lock_of_another_host_is_refused_until_unlocked(tmp_path, maps):
    path = tmp_path / "run.zarr"
    make_cwt(1).analyze(maps, store=path)
    _write_lock(path, host="elsewhere.example", pid=12345)
    with pytest.raises(StoreError, match=f"cwtflow unlock {path}"):
        make_cwt(2).analyze(maps, store=path, resume=True)
    result = CliRunner().invoke(cli, ["unlock", str(path)])
    assert result.exit_code == 0
    assert "removed the lock of pid 12345 on host elsewhere.example" in result.stdout
    make_cwt(2).analyze(maps, store=path, resume=True)


def test_unlock_refuses_a_live_owner(tmp_path):
    _write_lock(tmp_path / "run.zarr")
    started = psutil.Process().create_time()
    _write_lock(tmp_path / "run.zarr", started=started)
    result = CliRunner().invoke(cli, ["unlock", str(tmp_path / "run.zarr")])
    assert result.exit_code == 1
    assert "being written by a running process" in result.stderr


def test_stale_lock_of_a_dead_or_reused_pid_is_taken_over(tmp_path, maps, caplog):
    path = tmp_path / "run.zarr"
    make_cwt(1).analyze(maps, store=path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    _write_lock(path, pid=int(dead.stdout))
    make_cwt(2).analyze(maps, store=path, resume=True)
    assert "taking over the stale lock" in caplog.text
    _write_lock(path, started=1.0)  # this pid, another start time: a reused pid
    make_cwt(3).analyze(maps, store=path, resume=True)
    assert not (path / LOCK_NAME).exists()


# --- real processes -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import cwtflow.store_writer as writer
    from cwtflow.cli import main

    pause_at, flag, go, args = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    original = writer.ZarrSink.complete

    def complete(self, k, state, info):
        out = original(self, k, state, info)
        if k == pause_at:
            flag.write_text("paused")
            while not go.exists():
                time.sleep(0.02)
        return out

    writer.ZarrSink.complete = complete
    main(args)
    """
)


def spawn(pause_at: int, flag: Path, go: Path, args: list) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pause_at), str(flag), str(go), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, procs, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def run_args(maps_file: Path, store: Path, max_iter: int, *extra) -> list:
    return [
        "run",
        maps_file,
        "--out",
        store,
        "--max-iter",
        max_iter,
        "--tol",
        "0",
        "-q",
        "--n-scale",
        "2",
        "--min-scale",
        "2",
        "--step-scale",
        "2",
        "--chunks",
        *CHUNKS,
        *extra,
    ]


@pytest.fixture(scope="module")
def maps_file(maps, tmp_path_factory):
    return write_maps(maps, tmp_path_factory.mktemp("maps") / "maps.fits")


@pytest.mark.slow
def test_two_concurrent_writers_one_proceeds(tmp_path, maps_file, reference):
    """Two ``cwtflow run --resume`` on one store started at once: each pauses after its
    first iteration until released, so they certainly overlap; exactly one gets the lock."""
    store, go = tmp_path / "run.zarr", tmp_path / "go"
    flags = [tmp_path / "a.flag", tmp_path / "b.flag"]
    args = run_args(maps_file, store, 4, "--resume")
    procs = [spawn(1, flag, go, args) for flag in flags]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), procs, "a refusal")
        wait_for(lambda: any(f.exists() for f in flags), procs, "the lock holder to pause")
        go.write_text("go")
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    winner = next(i for i, p in enumerate(procs) if p.returncode == 0)
    refused = outs[1 - winner][1].strip().splitlines()
    assert len(refused) == 1, refused
    pid = procs[winner].pid
    assert refused[0].startswith(f"cwtflow: error: {store} is being written by another cwtflow ")
    assert f"(pid {pid} on host" in refused[0]
    assert not (store / LOCK_NAME).exists()
    result = cwtflow.read_result(store)
    assert_state_equals(result, reference[1][4])
    assert open_history(store).iterations == [4]


@pytest.mark.slow
def test_reader_during_appends_never_reads_pruned_data(tmp_path, maps_file, reference):
    """A writer process (keep_history=False, the default) appends 8 iterations; a reader loop
    opens and computes the newest iteration meanwhile: each read equals the uninterrupted run
    or is a StoreError telling to reopen."""
    store, flag, go = tmp_path / "run.zarr", tmp_path / "flag", tmp_path / "go"
    go.write_text("go")  # never pauses
    proc = spawn(0, flag, go, run_args(maps_file, store, 8))
    good, reopen = 0, 0
    try:
        while proc.poll() is None:
            try:
                history = open_history(store)
                k = history.iterations[-1]
                state = history.state(k).compute()
            except StoreError as exc:
                if "reopen" in str(exc):
                    reopen += 1
                elif "holds no complete" in str(exc) or "not a" in str(exc):
                    pass  # before the first group is complete
                else:
                    raise
                continue
            assert_state_equals(state, reference[1][k])
            good += 1
        err = proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert good >= 1
    assert_state_equals(open_history(store).final, reference[1][8])
    print(f"reads: {good} right, {reopen} told to reopen")


@pytest.mark.slow
def test_stale_lock_of_a_killed_writer_is_taken_over_by_resume(tmp_path, maps_file, reference):
    store, flag, go = tmp_path / "run.zarr", tmp_path / "flag", tmp_path / "go"
    proc = spawn(2, flag, go, run_args(maps_file, store, 4))
    try:
        wait_for(flag.exists, [proc], "the writer to pause")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_lock(store).pid == proc.pid  # left behind by the killed writer
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cwtflow.cli import main; main()",
            *map(str, run_args(maps_file, store, 4, "--resume")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"taking over the stale lock of pid {proc.pid}" in result.stderr
    assert not (store / LOCK_NAME).exists()
    assert_state_equals(cwtflow.read_result(store), reference[1][4])
