#!/usr/bin/env bash
# Start or stop a dask scheduler and N worker processes on this machine, bound to loopback and
# speaking TLS with credentials made for this cluster (only holders of $DASK_LOCAL_DIR/tls, i.e.
# you, can connect: loopback alone does not keep out other users of the machine).
#
#   cluster/local/dask-local.sh start [N]   # scheduler + N workers (default 2), prints the file
#   cluster/local/dask-local.sh status      # workers connected to the scheduler
#   cluster/local/dask-local.sh stop        # stops exactly the processes this script started
#
# Then:  source "$DASK_LOCAL_DIR/tls.env"     # the client credentials, as dask settings
#        cwtflow run ... --scheduler "$DASK_LOCAL_DIR/scheduler.json"
#
# Settings (environment):
#   DASK_LOCAL_DIR      state directory: scheduler file, pid files, logs (default ./dask-local)
#   DASK_LOCAL_HOST     interface to bind (default 127.0.0.1: nothing reachable from outside)
#   DASK_LOCAL_THREADS  threads per worker process (default 1)
#   DASK_LOCAL_MEMORY   memory limit per worker process (default auto: machine memory / N)
#   DASK_LOCAL_TIMEOUT  seconds to wait for the scheduler and the workers (default 60)
set -euo pipefail

DIR="${DASK_LOCAL_DIR:-./dask-local}"
HOST="${DASK_LOCAL_HOST:-127.0.0.1}"
THREADS="${DASK_LOCAL_THREADS:-1}"
MEMORY="${DASK_LOCAL_MEMORY:-auto}"
TIMEOUT="${DASK_LOCAL_TIMEOUT:-60}"
PYTHON="${PYTHON:-python}"
SCHEDULER_FILE="$DIR/scheduler.json"
TLS_ENV="$DIR/tls.env"
umask 077  # scheduler file, credentials, logs: readable and writable by their owner only

die() { echo "dask-local: $*" >&2; exit 1; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

make_credentials() {  # temporary TLS key and certificate in $DIR/tls, dask settings in tls.env
    "$PYTHON" - "$DIR/tls" >"$TLS_ENV" <<'PY'
import shlex
import sys

from cwtflow.cluster import write_tls_credentials

for key, value in write_tls_credentials(sys.argv[1]).items():
    print(f"export {key}={shlex.quote(value)}")
PY
}

wait_workers() {  # wait until $1 workers are connected, print the scheduler address
    "$PYTHON" - "$SCHEDULER_FILE" "$1" "$TIMEOUT" <<'PY'
import sys
from distributed import Client

path, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Client(scheduler_file=path, timeout=timeout, set_as_default=False) as client:
    if n > 0:
        client.wait_for_workers(n, timeout=timeout)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    print(f"scheduler {client.scheduler.address}, {len(workers)} workers")
PY
}

start() {
    local n="${1:-2}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "number of workers must be a positive integer, got '$n'"
    if alive "$DIR/scheduler.pid"; then
        die "a scheduler started from $DIR is still running (pid $(cat "$DIR/scheduler.pid")); stop it first"
    fi
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    rm -f "$SCHEDULER_FILE"
    make_credentials || die "could not make the TLS credentials (is cwtflow installed for $PYTHON?)"
    # shellcheck source=/dev/null
    source "$TLS_ENV"
    dask scheduler --protocol tls --host "$HOST" --port 0 --dashboard-address "$HOST:0" \
        --scheduler-file "$SCHEDULER_FILE" >"$DIR/scheduler.log" 2>&1 &
    echo $! >"$DIR/scheduler.pid"
    # the workers wait for the scheduler file themselves: start them at once
    dask worker --scheduler-file "$SCHEDULER_FILE" --protocol tls --host "$HOST" --nworkers "$n" \
        --nthreads "$THREADS" --memory-limit "$MEMORY" --dashboard-address "$HOST:0" \
        --death-timeout "$TIMEOUT" --local-directory "$DIR/workers" >"$DIR/workers.log" 2>&1 &
    echo $! >"$DIR/workers.pid"
    local waited=0
    until [[ -s "$SCHEDULER_FILE" ]] && alive "$DIR/scheduler.pid"; do
        if ! alive "$DIR/scheduler.pid" || (( waited++ > TIMEOUT * 10 )); then
            stop >/dev/null
            die "the scheduler did not start; see $DIR/scheduler.log"
        fi
        sleep 0.1
    done
    if ! wait_workers "$n"; then
        stop >/dev/null
        die "the cluster did not come up; see $DIR/scheduler.log and $DIR/workers.log"
    fi
    echo "scheduler file $SCHEDULER_FILE"
    echo "credentials: source $TLS_ENV"
    echo "run:  source $TLS_ENV; cwtflow run ... --scheduler $SCHEDULER_FILE"
}

stop_pid() {  # SIGTERM the recorded process, SIGKILL it if it is still there after 20 s
    local file="$1" pid
    alive "$file" || { rm -f "$file"; return 0; }
    pid="$(cat "$file")"
    kill -TERM "$pid"
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"
    fi
    rm -f "$file"
}

stop() {  # workers first: they leave the scheduler cleanly
    stop_pid "$DIR/workers.pid"
    stop_pid "$DIR/scheduler.pid"
    rm -f "$SCHEDULER_FILE" "$TLS_ENV"
    rm -rf "$DIR/tls"
    echo "stopped the cluster of $DIR"
}

status() {
    alive "$DIR/scheduler.pid" || die "no scheduler running from $DIR"
    # shellcheck source=/dev/null
    source "$TLS_ENV"
    wait_workers 0
}

case "${1:-}" in
    start) start "${2:-2}" ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start [N] | status | stop" ;;
esac
