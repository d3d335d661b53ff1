#!/usr/bin/env python
"""Start a dask cluster of SLURM or PBS worker jobs for cwtflow, and optionally run on it.

Run it on a login node (or in a small batch job) with cwtflow and dask-jobqueue installed::

    # print the worker job script that would be submitted, submit nothing
    python cluster/hpc/launch.py --system slurm --jobs 8 --dry-run

    # 8 worker jobs; run cwtflow against them, retrying with --resume if the driver dies
    python cluster/hpc/launch.py --system slurm --jobs 8 --retries 2 -- \
        cwtflow run survey.fits --out /scratch/$USER/survey.zarr --chunks 2048 2048

    # or keep the cluster up and point any number of runs at its scheduler file
    python cluster/hpc/launch.py --system pbs --jobs 8 --scheduler-file ~/cwtflow-scheduler.json
    cwtflow run survey.fits --out /scratch/$USER/survey.zarr --scheduler ~/cwtflow-scheduler.json

The scheduler runs in this process; worker jobs are cancelled when it exits. The command after
``--`` gets ``--scheduler <scheduler file>`` appended. The zarr store (``--out``) must be on a
file system that the login node and every compute node see at the same path.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask
import yaml
from distributed.security import Security

HERE = Path(__file__).resolve().parent
SYSTEMS = ("slurm", "pbs")
LOOPBACK = "127.0.0.1"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    else:
        command = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=SYSTEMS, required=True, help="batch system")
    parser.add_argument("--jobs", type=int, required=True, help="worker jobs (nodes) to submit")
    parser.add_argument(
        "--config",
        type=Path,
        default=HERE / "jobqueue.yaml",
        help="dask-jobqueue settings (default: jobqueue.yaml next to this script)",
    )
    parser.add_argument(
        "--scheduler-file",
        type=Path,
        default=Path.home() / "cwtflow-scheduler.json",
        help="where to write the scheduler's address for cwtflow run --scheduler",
    )
    parser.add_argument(
        "--min-workers",
        type=int,
        default=None,
        help="worker processes to wait for before running (default: all of them)",
    )
    parser.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for them")
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="rerun a failed command this many times, with --resume",
    )
    parser.add_argument(
        "--tls",
        choices=("temporary", "config"),
        default="temporary",
        help="TLS credentials of the cluster (always on): 'temporary' (default) makes a "
        "throw-away certificate and key for this cluster in --shared-temp-directory; 'config' "
        "uses the certificates named in dask's configuration (cluster/tls/dask-tls.yaml)",
    )
    parser.add_argument(
        "--shared-temp-directory",
        type=Path,
        default=Path.home() / ".cwtflow-dask",
        help="private directory (0700) every node sees, for the temporary TLS credentials",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address the scheduler and its dashboard listen on, e.g. 10.0.0.5 (default: "
        "the address of --interface, else 127.0.0.1; never all interfaces)",
    )
    parser.add_argument(
        "--interface",
        default=None,
        help="network interface of the scheduler and workers, e.g. ib0 (overrides the config)",
    )
    parser.add_argument(
        "--dashboard-port", type=int, default=8787, help="port of the dashboard on --host"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the worker job script and exit"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    return args, command


def load_config(path: Path) -> None:
    """Merge the jobqueue settings of ``path`` over dask's configuration."""
    with open(path) as f:
        settings = yaml.safe_load(f)
    if not isinstance(settings, dict) or "jobqueue" not in settings:
        raise SystemExit(f"launch.py: {path} has no 'jobqueue' section")
    dask.config.update(dask.config.config, settings, priority="new")


def scheduler_host(args: argparse.Namespace, system: str) -> str:
    """The one address the scheduler binds to: --host, else the address of the interface
    (--interface or the config's), else loopback."""
    if args.host:
        return args.host
    interface = args.interface or dask.config.get(f"jobqueue.{system}.interface", None)
    if not interface:
        return LOOPBACK
    from distributed.utils import get_ip_interface

    try:
        return get_ip_interface(interface)
    except ValueError as exc:
        raise SystemExit(f"launch.py: {exc}") from None


def make_security(args: argparse.Namespace) -> tuple[Security, dict[str, str]]:
    """Security of the cluster and the environment that hands its client credentials to the
    command run on it (empty for --tls config: the command reads the same configuration)."""
    if args.tls == "config":
        if not dask.config.get("distributed.comm.tls.ca-file", None):
            raise SystemExit(
                "launch.py: --tls config, but dask's configuration names no certificates "
                "(distributed.comm.tls.ca-file; see cluster/tls)"
            )
        return Security(require_encryption=True), {}
    from cwtflow.cluster import write_tls_credentials

    folder = args.shared_temp_directory.expanduser() / f"tls-{os.getpid()}"
    env = write_tls_credentials(folder)
    (folder / "tls.env").write_text(
        "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())
    )
    prefix = "DASK_DISTRIBUTED__COMM__TLS__"
    security = Security(
        require_encryption=True,
        tls_ca_file=env[f"{prefix}CA_FILE"],
        **{
            f"tls_{role}_{part}": env[f"{prefix}{role.upper()}__{part.upper()}"]
            for role in ("scheduler", "worker", "client")
            for part in ("cert", "key")
        },
    )
    return security, env


def make_cluster(args: argparse.Namespace, security: Security):
    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = {"slurm": SLURMCluster, "pbs": PBSCluster}[args.system]
    kwargs: dict = {}
    if args.interface is not None:
        kwargs["interface"] = args.interface
    host = scheduler_host(args, args.system)
    options = dict(dask.config.get(f"jobqueue.{args.system}.scheduler-options", None) or {})
    options.pop("interface", None)
    options.update(host=host, dashboard_address=f"{host}:{args.dashboard_port}")
    return cls(
        config_name=args.system,
        security=security,
        protocol="tls://",
        scheduler_options=options,
        shared_temp_directory=str(args.shared_temp_directory.expanduser()),
        **kwargs,
    )


def with_resume(command: list[str]) -> list[str]:
    return command if "--resume" in command else [*command, "--resume"]


def main(argv: list[str]) -> int:
    args, command = parse(argv)
    load_config(args.config)
    security, tls_env = make_security(args)
    cluster = make_cluster(args, security)
    try:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        from distributed import Client

        cluster.scale(jobs=args.jobs)
        processes = dask.config.get(f"jobqueue.{args.system}.processes") or 1
        expected = args.min_workers or args.jobs * int(processes)
        with Client(cluster) as client:
            print(f"waiting for {expected} worker processes ({args.jobs} jobs)...", flush=True)
            client.wait_for_workers(expected, timeout=args.wait)
            client.write_scheduler_file(str(args.scheduler_file))
            os.chmod(args.scheduler_file, 0o600)  # cwtflow refuses a file others can write
            print(f"scheduler {client.scheduler.address}", flush=True)
            print(f"dashboard {cluster.dashboard_link}", flush=True)
            print(f"scheduler file {args.scheduler_file}", flush=True)
            if tls_env:
                env_file = Path(tls_env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"]).parent
                print(f"client credentials: source {env_file / 'tls.env'}", flush=True)
            if not command:
                print("cluster up; Ctrl-C stops it and cancels the jobs", flush=True)
                while True:
                    time.sleep(3600)
            run = [*command, "--scheduler", str(args.scheduler_file)]
            env = {**os.environ, **tls_env}
            code = subprocess.call(run, env=env)
            for attempt in range(args.retries):
                if code == 0:
                    break
                print(f"command failed ({code}); resuming, retry {attempt + 1}", flush=True)
                code = subprocess.call(with_resume(run), env=env)
            return code
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.close()
        if tls_env:  # the credentials die with the cluster
            folder = Path(tls_env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"]).parent
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
