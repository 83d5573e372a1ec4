# Shared set-up of the taskfleet benchmark scripts (source it): a private nats-server with file
# storage and a fresh Postgres schema, both removed on exit, and helpers that start the release
# binaries against them. After `bench_setup`: $work (temp dir), $port (NATS), $schema, and the
# TASKFLEET_* variables exported for every binary started afterwards.

BIN=${BIN:-target/release}
source .dev/nats-bin

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
bench_cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    [[ -n ${KEEP_SCHEMA:-} ]] || psql -h 127.0.0.1 -U postgres -d test -qc "drop schema if exists $schema cascade" 2>/dev/null || true
    rm -rf "$work"
}

# bench_setup NAME: starts the private nats-server and names the schema.
bench_setup() {
    work=$(mktemp -d)
    port=$(free_port)
    schema="bench_${1}_$(date +%s)_$$"
    trap bench_cleanup EXIT
    "$TASKFLEET_NATS_SERVER_BIN" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
    pids+=($!)
    export TASKFLEET_NATS_URL=nats://127.0.0.1:$port TASKFLEET_DATABASE_SCHEMA=$schema TASKFLEET_LOG=warn
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}

# start_coordinator: starts one and waits until it is ready.
start_coordinator() {
    local http=127.0.0.1:$(free_port)
    TASKFLEET_COORDINATOR_HTTP_ADDR=$http $BIN/taskfleet-coordinator >"$work/coordinator.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do curl -fsS "http://$http/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "coordinator did not become ready" >&2; tail -n 20 "$work/coordinator.log" >&2; return 1
}

# start_worker ID: starts one worker in the background.
start_worker() {
    TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:$(free_port) TASKFLEET_WORKER_ID=bench-$1 $BIN/taskfleet-worker \
        >"$work/worker-$1.log" 2>&1 &
    pids+=($!)
}
