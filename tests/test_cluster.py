"""Runs on a real distributed cluster: scheduler and worker processes on loopback.

One `LocalCluster` of two single-threaded worker processes serves the module. Worker processes
are killed with SIGKILL mid-iteration (the nanny restarts them, the scheduler reruns the lost
tasks), the driver is killed mid-run and resumed against the same cluster, and the
``cluster/local`` script is started, used and stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest
import xarray as xr
import yaml
import zarr
from distributed import Client, LocalCluster
from distributed.security import Security

import cwtflow
from cwtflow import CWT, CWTKernels, InputError
from cwtflow.cluster import (
    TaskProgress,
    check_scheduler_file,
    client_summary,
    open_client,
    start_local_cluster,
)
from cwtflow.errors import ClusterError
from cwtflow.simulate import simulate_sky
from cwtflow.state import STATE_VARS

REPO = Path(__file__).parents[1]
LOCAL_SCRIPT = REPO / "cluster" / "local" / "dask-local.sh"
TLS_SCRIPT = REPO / "cluster" / "tls" / "make-certs.sh"
TLS_CONFIG = REPO / "cluster" / "tls" / "dask-tls.yaml"
CWTFLOW = [sys.executable, "-c", "from cwtflow.cli import main; main()"]
KERNELS = CWTKernels(n_scale=2, min_scale=1.5, step_scale=2.0)  # halo 24 pixels


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


def assert_gone(pid: int) -> None:
    """The process ``pid`` ends within 30 s (or is a zombie waiting for its parent)."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout=30)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        assert process.status() == psutil.STATUS_ZOMBIE, f"process {pid} still running"


def worker_pids(client: Client) -> dict[str, int]:
    """Process id of every worker, by worker address."""
    return client.run(os.getpid)


_TLS = "DASK_DISTRIBUTED__COMM__TLS__"


def credentials_env(security: Security, folder: Path) -> dict[str, str]:
    """The client credentials of ``security`` as files in ``folder`` and dask environment
    variables naming them (for a driver subprocess)."""
    folder.mkdir(mode=0o700)
    (folder / "cert.pem").write_text(security.tls_client_cert)
    (folder / "key.pem").write_text(security.tls_client_key)
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        f"{_TLS}CA_FILE": str(folder / "cert.pem"),
        f"{_TLS}CLIENT__CERT": str(folder / "cert.pem"),
        f"{_TLS}CLIENT__KEY": str(folder / "key.pem"),
    }


def security_from_env(env: dict[str, str]) -> Security:
    return Security(
        require_encryption=True,
        tls_ca_file=env[f"{_TLS}CA_FILE"],
        tls_client_cert=env[f"{_TLS}CLIENT__CERT"],
        tls_client_key=env[f"{_TLS}CLIENT__KEY"],
    )


def listening_hosts(pid: int) -> set[str]:
    """Addresses the process ``pid`` listens on (TCP)."""
    conns = psutil.Process(pid).net_connections("tcp")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # a killed worker's restart (a new process importing the stack) may take more than the
    # 15 s after which a LocalCluster gives the worker up and closes its nanny, on a loaded
    # 2-core machine; the kill tests need it back
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "180s"}),
        start_local_cluster(2, threads_per_worker=1, memory_limit="2GiB", dashboard=False) as c,
    ):
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    """A client of the module's cluster, with both workers up (a killed one is restarted)."""
    with Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(scope="module")
def small_sky() -> xr.Dataset:
    """128 x 160 pixels: tiles of 64 x 80 make 2 x 2 tiles (the graph of an iteration has a
    few hundred tasks: enough to kill a worker in the middle, few enough to stay fast)."""
    data, _ = simulate_sky((128, 160), n_sources=8, seed=3, psf_sigma=1.5, min_separation=8.0)
    return data


@pytest.fixture(scope="module")
def small_expected(small_sky: xr.Dataset) -> xr.Dataset:
    return CWT(KERNELS, max_iter=2, tol=0).analyze(small_sky)


# --- client set-up ------------------------------------------------------------------------


def test_local_cluster_binds_loopback(client: Client, cluster: LocalCluster) -> None:
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    workers = client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 2
    assert all(address.startswith("tls://127.0.0.1:") for address in workers)
    # every socket the scheduler (this process) and the worker processes listen on
    for pid in [os.getpid(), *worker_pids(client).values()]:
        hosts = listening_hosts(pid)
        assert hosts and hosts <= {"127.0.0.1"}, (pid, hosts)


def test_open_client_connects_and_describes(cluster: LocalCluster) -> None:
    lines: list[str] = []
    security = cluster.security  # the run's credentials
    with open_client(
        scheduler=cluster.scheduler_address, security=security, echo=lines.append
    ) as c:
        assert c is not None
        assert c.scheduler.address == cluster.scheduler_address
        assert c.submit(lambda x: x + 1, 41).result() == 42
    assert len(lines) == 1
    assert cluster.scheduler_address in lines[0] and "2 workers" in lines[0]
    with open_client() as none:
        assert none is None


def test_open_client_with_scheduler_file(cluster: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": cluster.scheduler_address}))
    path.chmod(0o644)
    for kwargs in ({"scheduler_file": path}, {"scheduler": str(path)}):
        with open_client(security=cluster.security, **kwargs) as c:
            assert c.scheduler.address == cluster.scheduler_address


def test_open_client_refuses_bad_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="only one of"):
        with open_client(scheduler="tcp://127.0.0.1:1", workers=2):
            pass
    with pytest.raises(InputError, match="positive integer"):
        with open_client(workers=0):
            pass
    with pytest.raises(InputError, match="missing"):
        with open_client(scheduler_file=tmp_path / "missing.json"):
            pass
    with pytest.raises(
        ClusterError, match=r"cannot connect to dask scheduler at tcp://127\.0\.0\.1"
    ):
        with open_client(scheduler="tcp://127.0.0.1:1", timeout=1):
            pass


def test_open_client_starts_and_stops_loopback_workers() -> None:
    lines: list[str] = []
    key = "distributed.deploy.lost-worker-timeout"
    default = dask.config.get(key)
    with open_client(workers=1, echo=lines.append, no_worker_timeout=75) as c:
        # a worker its nanny restarts is waited for as long as the run waits for any worker
        assert dask.config.get(key) == "75.0s" != default
        assert c.scheduler.address.startswith("tls://127.0.0.1:")
        (pid,) = worker_pids(c).values()
        assert listening_hosts(pid) <= {"127.0.0.1"}
    assert "1 worker," in lines[0]
    assert_gone(pid)
    assert dask.config.get(key) == default


# --- security: only the run's credentials open the cluster --------------------------------


def test_cluster_refuses_clients_without_its_credentials(cluster: LocalCluster) -> None:
    """Stands in for another user of the machine: the address alone is not enough."""
    address = cluster.scheduler_address
    assert address.startswith("tls://127.0.0.1:")
    for kwargs in ({}, {"security": Security.temporary()}):  # none, or other credentials
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - whatever distributed raises
            Client(address, timeout=3, set_as_default=False, **kwargs)
        assert time.monotonic() - started < 10
    with pytest.raises(Exception):  # noqa: B017 - plain TCP to the TLS listener
        Client(address.replace("tls://", "tcp://"), timeout=3, set_as_default=False)
    # through cwtflow: one clear error each
    with pytest.raises(ClusterError, match="no client credentials"):
        with open_client(scheduler=address, timeout=3):
            pass
    with pytest.raises(ClusterError, match="cannot connect"):
        with open_client(scheduler=address, security=Security.temporary(), timeout=3):
            pass


# --- scheduler files and addresses --------------------------------------------------------


def test_scheduler_file_must_be_private_and_valid(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": "tls://127.0.0.1:8786"}))
    path.chmod(0o644)
    assert check_scheduler_file(path) == "tls://127.0.0.1:8786"
    for mode in (0o664, 0o646, 0o666):
        path.chmod(mode)
        with pytest.raises(InputError, match="group or others can write it"):
            check_scheduler_file(path)
    path.chmod(0o600)
    with pytest.raises(InputError, match="is missing"):
        check_scheduler_file(tmp_path / "missing.json")
    junk = tmp_path / "junk.json"
    for text in ("junk", "[1, 2]", '{"address": "nowhere"}', '{"id": 1}'):
        junk.write_text(text)
        started = time.monotonic()
        with pytest.raises(InputError, match="scheduler"):
            with open_client(scheduler_file=junk):
                pass
        assert time.monotonic() - started < 2


def test_scheduler_file_of_another_user_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": "tls://127.0.0.1:8786"}))
    path.chmod(0o600)
    monkeypatch.setattr(os, "getuid", lambda: path.stat().st_uid + 1)  # we are someone else
    with pytest.raises(InputError, match="belongs to user id"):
        check_scheduler_file(path)


@pytest.mark.slow
def test_cli_bad_scheduler_one_line_fast(tmp_path: Path, small_sky: xr.Dataset) -> None:
    maps = tmp_path / "maps.fits"
    cwtflow.write_maps(small_sky, maps)
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    junk.chmod(0o600)
    cases = {
        "foo": "neither a scheduler address",
        str(tmp_path / "missing.json"): "is missing",
        str(junk): "not a dask scheduler file",
    }
    for value, message in cases.items():
        started = time.monotonic()
        out = subprocess.run(
            [*CWTFLOW, "run", str(maps), "--out", str(tmp_path / "o.fits"), "--scheduler", value],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cwtflow: error:"), out.stderr
        assert message in lines[0]
        assert elapsed < 5, elapsed


# --- no worker left: the watchdog --------------------------------------------------------


def _spawned_workers() -> list[psutil.Process]:
    """Worker processes started by nannies of this process (multiprocessing spawn)."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]


@pytest.mark.slow
def test_all_workers_killed_ends_in_cluster_error() -> None:
    stop = threading.Event()

    def kill_workers() -> None:  # faster than the nanny can bring one back
        while not stop.is_set():
            for process in _spawned_workers():
                with contextlib.suppress(psutil.Error):
                    process.kill()
            time.sleep(0.05)

    killer = threading.Thread(target=kill_workers, daemon=True)
    try:
        with pytest.raises(ClusterError, match="no worker for 3 s") as caught:
            with open_client(workers=1, no_worker_timeout=3, memory_limit=None) as c:
                killer.start()
                started = time.monotonic()
                c.submit(time.sleep, 60).result()
        elapsed = time.monotonic() - started
    finally:
        stop.set()
    assert 3 <= elapsed < 20, elapsed
    assert "CWTFLOW_NO_WORKER_TIMEOUT" in str(caught.value)


@pytest.mark.slow
def test_cli_killed_worker_is_one_error_line(tmp_path: Path) -> None:
    """A task that kills every worker running it: KilledWorker becomes one error line."""
    code = (
        "import os, signal\n"
        "from cwtflow.cluster import open_client\n"
        "from cwtflow.cli import _fail\n"
        "from cwtflow.errors import CWTFlowError\n"
        "def die():\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        "        with open_client(workers=1, no_worker_timeout=60, memory_limit=None) as c:\n"
        "            c.submit(die).result()\n"
        "    except CWTFlowError as exc:\n"
        "        raise SystemExit(_fail(str(exc)))\n"
    )
    script = tmp_path / "killer.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("cwtflow: error:")]
    assert len(errors) == 1 and errors == lines[-1:], out.stderr
    assert errors[0].startswith("cwtflow: error: task") and "workers that died" in errors[0]
    # no traceback of the run itself (a worker that the nanny was restarting while the
    # cluster closed may still print its own; see cluster/README.md)
    assert "KilledWorker" not in out.stderr


def test_task_progress_counts_cluster_tasks(client: Client) -> None:
    import dask.array as da

    out = io.StringIO()
    x = da.arange(10_000, chunks=1_000)
    with TaskProgress(client, file=out, interval=0.05) as bar:
        with dask.config.set(scheduler=client):
            assert int((x * 2).sum().compute()) == 2 * sum(range(10_000))
    assert bar.total >= 11 and bar.done == bar.total and bar.erred == 0
    assert f"{bar.done}/{bar.total}" in out.getvalue()


def test_client_summary_names_dashboard_state(client: Client) -> None:
    line = client_summary(client)
    assert line.startswith(f"dask scheduler {client.scheduler.address}: 2 workers, 2 threads")


# --- CWT runs on the cluster --------------------------------------------------------------


def test_cluster_run_equals_in_memory(
    client: Client, small_sky: xr.Dataset, small_expected: xr.Dataset
) -> None:
    cwt = CWT(KERNELS, max_iter=2, tol=0)
    result = cwt.analyze(small_sky, chunks=(64, 56), client=client)  # uneven 2 x 3 tiles
    assert result.attrs["iterations"] == 2
    assert isinstance(result["model"].data, np.ndarray)  # numpy in, numpy out
    assert_states_equal(result, small_expected)
    assert result.attrs["residual_variance"] == pytest.approx(
        small_expected.attrs["residual_variance"], rel=1e-10
    )


def test_cluster_run_numpy_input_default_tiles(
    client: Client, small_sky: xr.Dataset, small_expected: xr.Dataset, monkeypatch
) -> None:
    import cwtflow.engine

    monkeypatch.setattr(cwtflow.engine, "CLUSTER_TILE", 80)  # the small map in 2 x 2 tiles
    with TaskProgress(client, disable=True) as bar:
        result = CWT(KERNELS, max_iter=2, tol=0).analyze(small_sky, client=client)
    assert bar.done > 2 * 4  # tiles really ran as tasks on the cluster
    assert_states_equal(result, small_expected)


def test_cluster_run_numpy_input_into_store(
    client: Client, small_sky: xr.Dataset, small_expected: xr.Dataset, tmp_path: Path
) -> None:
    """Numpy maps and a store: the driver writes the inputs and iteration 0 (no map inside a
    task graph); the workers run one task per tile and iteration and nothing else."""
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        result = CWT(KERNELS, max_iter=2, tol=0).analyze(
            small_sky, chunks=(64, 80), store=tmp_path / "run.zarr", client=client
        )
    names = sorted({str(task["key"]).rsplit("-", 3)[0] for task in stream.data})
    assert names == ["store-tile"]
    assert len(stream.data) == 2 * 4  # 2 iterations of 2 x 2 tiles
    assert_states_equal(result, small_expected)


def test_cluster_run_with_island_threshold_into_store(
    client: Client, small_sky: xr.Dataset, tmp_path: Path
) -> None:
    """With an island threshold the components are joined across tiles on the cluster: tile
    tasks, their label reports and one join per iteration; the result is the in-memory run's."""
    from distributed import get_task_stream

    cwt = CWT(KERNELS, max_iter=2, tol=0, significance_island_threshold=4.0)
    expected = cwt.analyze(small_sky)
    with get_task_stream(client) as stream:
        result = cwt.analyze(small_sky, chunks=(64, 80), store=tmp_path / "run.zarr", client=client)
    names = {str(task["key"]).split("-")[0] for task in stream.data}
    assert {"store", "tile"} <= names <= {"store", "tile", "getitem"}
    assert sum("tile-join" in str(task["key"]) for task in stream.data) == 2
    assert_states_equal(result, expected)


def test_client_must_be_a_client(small_sky: xr.Dataset) -> None:
    with pytest.raises(InputError, match=r"distributed\.Client"):
        CWT(KERNELS).analyze(small_sky, client="tcp://127.0.0.1:8786")


# --- faults -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sink", ["memory", "store"])
def test_worker_killed_mid_iteration(
    sink: str,
    client: Client,
    small_sky: xr.Dataset,
    small_expected: xr.Dataset,
    tmp_path: Path,
) -> None:
    """SIGKILL a busy worker once iteration 2 has finished some tasks and not all of them."""
    finished: list[int] = []
    first_done = threading.Event()
    outcome: dict[str, object] = {}

    def callback(info: cwtflow.IterationInfo) -> None:
        finished.append(info.iteration)
        if info.iteration == 1:
            first_done.set()

    store = tmp_path / "run.zarr" if sink == "store" else None

    def run() -> None:
        try:
            cwt = CWT(KERNELS, max_iter=2, tol=0)
            outcome["state"] = cwt.analyze(
                small_sky, chunks=(64, 80), store=store, client=client, callback=callback
            )
        except BaseException as exc:
            outcome["error"] = exc

    pids_before = worker_pids(client)
    with TaskProgress(client, disable=True) as bar:
        thread = threading.Thread(target=run)
        thread.start()
        assert first_done.wait(timeout=60), outcome.get("error")
        start_done, _, _ = bar.poll()
        deadline = time.monotonic() + 60
        while True:
            done, total, _ = bar.poll()
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if done > start_done and done < total and busy:
                break
            assert time.monotonic() < deadline, "iteration 2 never got under way"
        victim = max(busy, key=lambda w: len(busy[w]))
        os.kill(pids_before[victim], signal.SIGKILL)
        finished_at_kill = list(finished)
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert finished_at_kill == [1]  # the kill came in the middle of iteration 2
    assert finished == [1, 2]
    client.wait_for_workers(2, timeout=60)
    assert pids_before[victim] not in worker_pids(client).values()  # really replaced
    state = outcome["state"]
    if store is not None:
        state = cwtflow.open_history(store).final
    assert_states_equal(state.compute(), small_expected)


def _complete(store: Path, k: int) -> bool:
    """Iteration ``k`` of the history store is marked complete (read with plain zarr)."""
    try:
        group = zarr.open_group(str(store), path=f"iterations/{k:04d}", mode="r")
    except Exception:
        return False
    return bool(group.attrs.get("cwtflow_complete"))


def _scheduler_clients(dask_scheduler) -> set[str]:
    return set(dask_scheduler.clients)


def _executing(dask_worker) -> int:
    return len(dask_worker.state.executing)


def _wait_driver_gone(client: Client, clients: set[str], timeout: float = 60) -> None:
    """Until the scheduler has dropped the dead driver's client (releasing its tasks) and no
    worker still executes one of them."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_scheduler_clients) - clients or any(
        client.run(_executing).values()
    ):
        assert time.monotonic() < deadline, "cluster still busy with the dead driver's tasks"
        time.sleep(0.05)


@pytest.mark.slow
def test_driver_killed_and_resumed_against_cluster(
    client: Client,
    cluster: LocalCluster,
    small_sky: xr.Dataset,
    tmp_path: Path,
) -> None:
    maps = tmp_path / "maps.fits"
    cwtflow.write_maps(small_sky, maps)
    store = tmp_path / "run.zarr"
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": cluster.scheduler_address}))
    env = {**os.environ, **credentials_env(cluster.security, tmp_path / "tls")}
    base = [*CWTFLOW, "run", str(maps), "--out", str(store)]
    options = [
        "--scheduler",
        str(scheduler_file),
        "--chunks",
        "64",
        "80",
        "--n-scale",
        str(KERNELS.n_scale),
        "--min-scale",
        str(KERNELS.min_scale),
        "--step-scale",
        str(KERNELS.step_scale),
        "--max-iter",
        "3",
        "--tol",
        "0",
        "--quiet",
    ]
    clients = client.run_on_scheduler(_scheduler_clients)
    driver = subprocess.Popen([*base, *options], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 90
    while not _complete(store, 1):
        assert driver.poll() is None, driver.stderr.read()
        assert time.monotonic() < deadline, "iteration 1 never completed"
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stderr.close()
    assert not _complete(store, 3)  # killed mid-run
    _wait_driver_gone(client, clients)
    resumed = subprocess.run(
        [*base, *options, "--resume"], capture_output=True, text=True, timeout=120, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    expected = CWT(KERNELS, max_iter=3, tol=0).analyze(small_sky)
    history = cwtflow.open_history(store)
    assert len(history.table()) == 3
    assert_states_equal(history.final.compute(), expected)


# --- cluster/local recipe -----------------------------------------------------------------


@pytest.mark.slow
def test_local_recipe_script(
    tmp_path: Path, small_sky: xr.Dataset, small_expected: xr.Dataset
) -> None:
    state_dir = tmp_path / "dask-local"
    env = {**os.environ, "DASK_LOCAL_DIR": str(state_dir), "PYTHON": sys.executable}

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(LOCAL_SCRIPT), *args], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    scheduler_file = state_dir / "scheduler.json"
    started = script("start", "2")
    pids: list[int] = []
    try:
        assert started.returncode == 0, started.stderr
        assert str(scheduler_file) in started.stdout
        pids = [int((state_dir / f"{name}.pid").read_text()) for name in ("scheduler", "workers")]
        assert oct(scheduler_file.stat().st_mode)[-3:] == "600"
        tls_env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (state_dir / "tls.env").read_text().splitlines()
        )
        security = security_from_env(tls_env)
        with pytest.raises(ClusterError, match="cannot connect"):  # other credentials
            with open_client(scheduler=str(scheduler_file), security=Security.temporary()):
                pass
        with open_client(scheduler=str(scheduler_file), security=security) as c:
            assert c.scheduler.address.startswith("tls://127.0.0.1:")
            workers = worker_pids(c)
            pids += workers.values()
            assert len(workers) == 2
            assert all(address.startswith("tls://127.0.0.1:") for address in workers)
            for pid in pids:  # scheduler, nannies, workers: nothing on another interface
                assert listening_hosts(pid) <= {"127.0.0.1"}, pid
            cwt = CWT(KERNELS, max_iter=2, tol=0)
            result = cwt.analyze(small_sky, chunks=(64, 80), client=c)
    finally:
        stopped = script("stop")
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        assert_gone(pid)
    assert not scheduler_file.exists() and not (state_dir / "tls").exists()
    assert_states_equal(result, small_expected)


# --- cluster/tls recipe -------------------------------------------------------------------


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested dask configuration as dotted keys (what `dask.config.set` merges key by key)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.slow
def test_tls_recipe(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    made = subprocess.run(
        ["bash", str(TLS_SCRIPT), str(certs)],
        env={**os.environ, "DASK_TLS_BITS": "2048"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert oct((certs / "worker.key").stat().st_mode)[-3:] == "600"
    text = TLS_CONFIG.read_text().replace("/etc/cwtflow/tls", str(certs))
    config = _flat(yaml.safe_load(text))
    with dask.config.set(config), start_local_cluster(1, dashboard=False) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        with open_client(scheduler=address) as c:
            (worker,) = c.scheduler_info(n_workers=-1)["workers"]
            assert worker.startswith("tls://127.0.0.1:")
            assert c.submit(lambda x: 2 * x, 21).result() == 42
        # plain tcp and a client without the certificates are both refused
        with pytest.raises(ClusterError, match="cannot connect"):
            with open_client(scheduler=address.replace("tls://", "tcp://"), timeout=2):
                pass
        no_certs = {
            "distributed.comm.tls.client.cert": None,
            "distributed.comm.tls.client.key": None,
        }
        with dask.config.set(no_certs), pytest.raises(ClusterError, match="no client credentials"):
            with open_client(scheduler=address, timeout=2):
                pass


# --- cluster/hpc and cluster/kubernetes recipes -------------------------------------------


@pytest.mark.parametrize(
    ("system", "directive"), [("slurm", "#SBATCH --cpus-per-task=32"), ("pbs", "#PBS -l select=1")]
)
@pytest.mark.slow
def test_hpc_launcher_job_script(system: str, directive: str, tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (test extra) is not installed")
    launcher = REPO / "cluster" / "hpc" / "launch.py"
    command = [sys.executable, str(launcher), "--system", system, "--jobs", "2", "--dry-run"]
    shared = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in ([], ["--interface", "lo"]):
        out = subprocess.run(
            [*command, "--shared-temp-directory", str(shared), *extra],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        script = out.stdout
        assert directive in script
        assert "source $HOME/cwtflow-env/bin/activate" in script
        worker = next(line for line in script.splitlines() if "dask_worker" in line)
        # the scheduler binds to loopback (no interface in the config) or to lo's address,
        # and speaks TLS with temporary credentials handed to the workers as files
        assert " tls://127.0.0.1:" in worker
        assert "--tls-ca-file" in worker and "--tls-key" in worker
        assert "--nworkers 32" in worker and "--nthreads 1" in worker
        assert list(shared.iterdir()) == []  # the credentials went with the cluster


def test_kubernetes_manifests_fit_together() -> None:
    folder = REPO / "cluster" / "kubernetes"
    claim, cluster = yaml.safe_load_all((folder / "daskcluster.yaml").read_text())
    (job,) = yaml.safe_load_all((folder / "driver-job.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    name = cluster["metadata"]["name"]
    scheduler, worker = cluster["spec"]["scheduler"], cluster["spec"]["worker"]
    assert scheduler["service"]["selector"] == {
        "dask.org/cluster-name": name,
        "dask.org/component": "scheduler",
    }
    ports = {p["name"]: p["port"] for p in scheduler["service"]["ports"]}
    assert ports["tcp-comm"] == 8786
    (sched_container,) = scheduler["spec"]["containers"]
    (worker_container,) = worker["spec"]["containers"]
    (driver,) = job["spec"]["template"]["spec"]["containers"]
    assert sched_container["args"][:2] == ["dask", "scheduler"]
    assert worker_container["args"][:2] == ["dask", "worker"]
    images = {c["image"] for c in (sched_container, worker_container, driver)}
    assert len(images) == 1  # one image (cluster/kubernetes/Dockerfile) everywhere
    # workers and driver see the same store at the same path
    driver_pod = job["spec"]["template"]["spec"]
    for pod, container in ((worker["spec"], worker_container), (driver_pod, driver)):
        volumes = pod["volumes"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in volumes
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: claims.get(m["name"]) for m in container["volumeMounts"]}
        assert mounts["/data"] == claim["metadata"]["name"]
    args = driver["args"]
    assert args[:2] == ["cwtflow", "run"] and "--resume" in args
    from cwtflow.cli import run

    run.make_context("run", args[2:])  # valid options of the real command line
    address = f"tls://{name}-scheduler:{ports['tcp-comm']}"
    assert args[args.index("--scheduler") + 1] == address
    # TLS everywhere: the scheduler listens on tls, workers dial it, every pod mounts the
    # Secret and gets the same dask TLS settings
    assert sched_container["args"][2:4] == ["--protocol", "tls"]
    assert worker_container["args"][2] == address
    pods = ((scheduler["spec"], sched_container), (worker["spec"], worker_container))
    for pod, container in (*pods, (driver_pod, driver)):
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
        assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"].startswith("/etc/cwtflow/tls/")
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert secrets["tls"] == "cwtflow-tls" and mounts["tls"] == "/etc/cwtflow/tls"
    assert args[args.index("--out") + 1].startswith("/data/")
    dockerfile = (folder / "Dockerfile").read_text()
    assert "COPY cwtflow ./cwtflow" in dockerfile and "pip install ." in dockerfile
