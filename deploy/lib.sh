# Shared by the deploy scripts: where Flower's commands are, and process start/stop.
# A checkout with `make setup` done uses its .venv; otherwise the commands must be on PATH.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -x $here/../.venv/bin/flower-superlink ]]; then
    bin=$(cd "$here/../.venv/bin" && pwd)/
    export PATH="${bin%/}:$PATH"  # Flower starts its own helpers (flower-superexec, flwr-clientapp) by name
else
    bin=""
fi
export FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# SuperExec looks for new tasks every second by default; a round should not wait for it.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

free_port() { "${bin}python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
    || python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start NAME PIDFILE LOGFILE CMD...: run CMD in its own session (so that stop reaches the
# children Flower starts), refuse if PIDFILE names a live process.
start() {
    local name=$1 pidfile=$2 log=$3; shift 3
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "$name is already running (pid $(cat "$pidfile")); stop it first"
    fi
    echo "--- $(date -u +%FT%TZ) start" >> "$log"  # a restart appends: the earlier run's lines stay
    setsid "$@" >>"$log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
}

descendants() {  # every process below PID (Flower detaches some of them into new sessions)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}

# stop NAME PIDFILE: SIGTERM to the process (a SuperNode then leaves the federation cleanly),
# after 15 s to its group and descendants, SIGKILL to whatever is left 5 s later.
stop() {
    local name=$1 pidfile=$2 pid tree
    [[ -f $pidfile ]] || { echo "$name: not running (no $pidfile)"; return 0; }
    pid=$(cat "$pidfile")
    tree="$pid $(descendants "$pid" | tr '\n' ' ')"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -TERM -- "-$pid" 2>/dev/null || true
        kill -TERM $tree 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill -KILL $tree 2>/dev/null || true
    rm -f "$pidfile"
    echo "$name: stopped"
}

# wait_for_port NAME PID HOST PORT LOG: until HOST:PORT accepts connections, or fail with the
# log's last lines if the process exits or 60 s pass.
wait_for_port() {
    local name=$1 pid=$2 host=$3 port=$4 log=$5
    for _ in $(seq 600); do
        if ! kill -0 "$pid" 2>/dev/null; then tail -n 20 "$log" >&2; die "$name exited at start (log: $log)"; fi
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail -n 20 "$log" >&2; die "$name did not open $host:$port within 60 s (log: $log)"
}
