#!/usr/bin/env bash
# Start or stop a SuperNode: one client, training on data it holds.
#
#   deploy/supernode.sh start DIR NAME --superlink HOST:PORT --ca CA.crt --key KEY \
#       --partition I --partitions N [--data-path FOLDER] [--ledger FILE] [--state-path FOLDER] \
#       [--epsilon E --delta D --clip C] [--secure-noise] [--report-diagnostics] [--port Q] [--no-worker] \
#       [--retry SECONDS]
#   deploy/supernode.sh start DIR NAME --superlink HOST:PORT --insecure --partition I --partitions N ...
#   deploy/supernode.sh stop DIR NAME
#
# Secure by default: the SuperLink's certificate is checked against CA.crt, and the node
# authenticates with KEY (made by deploy/node-key.sh, registered at the SuperLink). FOLDER is
# this node's own training data (`fedortho export-partition` writes one); without it the
# node reads partition I of the run's dataset. --ledger keeps the privacy budget of this
# node's data across runs; --state-path keeps the client's state (accountant history, noise
# plan, optimizer state) on disk after every round, so a restarted node or a resumed run goes
# on with it (default: DIR/NAME-state); --epsilon/--delta/--clip pin the privacy settings this node
# accepts; --secure-noise seeds the noise from OS randomness. Q is the node's local Runtime
# API port (a free one by default). Log and pid file go to DIR/NAME.log and DIR/NAME.pid.
# A `fedortho node-worker` (log DIR/NAME-worker.log) starts beside the SuperNode and keeps the
# model and data in memory across rounds; --no-worker trains in Flower's per-message process.
# A SuperNode the SuperLink does not accept (after a crash it keeps the node's old session open
# for about a minute) is started again every 5 s for --retry seconds (default 180).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[[ $# -ge 3 && $1 != -h && $1 != --help ]] || { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
action=$1 dir=$2 name=$3; shift 3
pidfile=$dir/$name.pid log=$dir/$name.log
case $action in
    stop) stop "supernode $name" "$pidfile"; stop "node worker $name" "$dir/$name-worker.pid" >/dev/null; exit 0 ;;
    start) ;;
    *) die "unknown action '$action' (start or stop)" ;;
esac
superlink="" ca="" key="" insecure=0 port="" partition="" partitions="" config=() worker=1 retry=180
state_path=$dir/$name-state
while [[ $# -gt 0 ]]; do
    case $1 in
        --superlink) superlink=$2; shift 2 ;;
        --ca) ca=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --insecure) insecure=1; shift ;;
        --port) port=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --partitions) partitions=$2; shift 2 ;;
        --data-path) [[ -d $2 ]] || die "data folder $2 does not exist"
                     config+=("data-path=\"$(cd "$2" && pwd)\""); shift 2 ;;
        --ledger) mkdir -p "$(dirname "$2")"
                  config+=("privacy-ledger=\"$(cd "$(dirname "$2")" && pwd)/$(basename "$2")\""); shift 2 ;;
        --state-path) state_path=$2; shift 2 ;;
        --epsilon|--delta|--clip) config+=("${1#--}=$2"); shift 2 ;;
        --secure-noise) config+=("secure-noise=true"); shift ;;
        --report-diagnostics) config+=("report-diagnostics=true"); shift ;;
        --no-worker) worker=0; shift ;;
        --retry) retry=$2; shift 2 ;;
        *) die "unknown option '$1'" ;;
    esac
done
[[ -n $superlink ]] || die "give --superlink HOST:PORT"
mkdir -p "$state_path"
config+=("state-path=\"$(cd "$state_path" && pwd)\"")
[[ $partition =~ ^[0-9]+$ && $partitions =~ ^[0-9]+$ ]] || die "give --partition I and --partitions N (whole numbers)"
(( partition < partitions )) || die "--partition $partition is out of range for --partitions $partitions"
if [[ $insecure == 1 ]]; then
    [[ -z $ca && -z $key ]] || die "--insecure excludes --ca and --key"
    echo "supernode $name: WARNING: no TLS and no authentication (loopback experiments only)"
    tls=(--insecure)
else
    [[ -n $ca && -n $key ]] || die "give --ca CA.crt and --key KEY, or --insecure for a loopback experiment"
    [[ -r $ca ]] || die "cannot read $ca"
    [[ -r $key ]] || die "cannot read $key"
    tls=(--root-certificates "$ca" --auth-supernode-private-key "$key")
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd) pidfile=$(cd "$dir" && pwd)/$name.pid log=$dir/$name.log
if [[ $worker == 1 ]]; then
    socket=$dir/$name.sock
    # A SuperNode that crashed left its worker running: the restarted one uses it.
    if [[ -S $socket && -f $dir/$name-worker.pid ]] && kill -0 "$(cat "$dir/$name-worker.pid")" 2>/dev/null; then
        echo "supernode $name: reusing its running node worker (pid $(cat "$dir/$name-worker.pid"))"
    else
        start "node worker $name" "$dir/$name-worker.pid" "$dir/$name-worker.log" "${bin}fedortho" node-worker --socket "$socket"
        for _ in $(seq 600); do
            [[ -S $socket ]] && break
            kill -0 "$(cat "$dir/$name-worker.pid")" 2>/dev/null || break
            sleep 0.1
        done
        [[ -S $socket ]] || { tail -n 5 "$dir/$name-worker.log" >&2; die "node worker $name did not start (log: $dir/$name-worker.log)"; }
    fi
    config+=("worker-socket=\"$socket\"")
fi
start "supernode $name" "$pidfile" "$log" "$here/run-supernode.sh" "$log" "$retry" "${bin}flower-supernode" --superlink "$superlink" --port "${port:-$(free_port)}" \
    --node-config "partition-id=$partition num-partitions=$partitions ${config[*]:-}" "${tls[@]}"
sleep 2
if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    tail -n 20 "$log" >&2
    stop "node worker $name" "$dir/$name-worker.pid" >/dev/null
    die "supernode $name exited at start (log: $log)"
fi
echo "supernode $name: partition $partition of $partitions -> $superlink (pid $(cat "$pidfile"), log $log)"
