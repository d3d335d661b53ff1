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
import subprocess
import sys
import time
from pathlib import Path

import dask
import yaml

HERE = Path(__file__).resolve().parent
SYSTEMS = ("slurm", "pbs")


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
        "--tls-temporary",
        action="store_true",
        help="encrypt all traffic with a throw-away certificate shared through the "
        "--shared-temp-directory (see cluster/tls for permanent certificates)",
    )
    parser.add_argument(
        "--shared-temp-directory",
        type=Path,
        default=Path.home() / ".cwtflow-dask",
        help="directory every node sees, for --tls-temporary credentials",
    )
    parser.add_argument(
        "--interface",
        default=None,
        help="network interface of the scheduler and workers, e.g. ib0 (overrides the config)",
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


def make_cluster(args: argparse.Namespace):
    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = {"slurm": SLURMCluster, "pbs": PBSCluster}[args.system]
    kwargs: dict = {}
    if args.interface is not None:
        kwargs["interface"] = args.interface
    if args.tls_temporary:
        from distributed.security import Security

        args.shared_temp_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        kwargs.update(
            security=Security.temporary(),
            shared_temp_directory=str(args.shared_temp_directory),
            protocol="tls://",
        )
    return cls(config_name=args.system, **kwargs)


def with_resume(command: list[str]) -> list[str]:
    return command if "--resume" in command else [*command, "--resume"]


def main(argv: list[str]) -> int:
    args, command = parse(argv)
    load_config(args.config)
    cluster = make_cluster(args)
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
            print(f"scheduler {client.scheduler.address}", flush=True)
            print(f"dashboard {cluster.dashboard_link}", flush=True)
            print(f"scheduler file {args.scheduler_file}", flush=True)
            if not command:
                print("cluster up; Ctrl-C stops it and cancels the jobs", flush=True)
                while True:
                    time.sleep(3600)
            run = [*command, "--scheduler", str(args.scheduler_file)]
            code = subprocess.call(run)
            for attempt in range(args.retries):
                if code == 0:
                    break
                print(f"command failed ({code}); resuming, retry {attempt + 1}", flush=True)
                code = subprocess.call(with_resume(run))
            return code
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
