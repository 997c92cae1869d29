#!/usr/bin/env bash
# The whole deployment on one machine: certificates, node keys, a SuperLink with TLS and node
# authentication, one SuperNode per client reading its own data folder and keeping a privacy
# ledger, a `flwr run`, and everything stopped at the end.
#
#   deploy/loopback.sh DIR [--nodes N] [--rounds R] [--insecure] [--no-worker] [--keep] [RUN-CONFIG ...]
#
# RUN-CONFIG entries are `key=value` run settings passed to `flwr run` (e.g. model="/x/tiny"
# local-steps=2); the run folder is DIR/run. --keep leaves the SuperLink and SuperNodes up;
# --no-worker starts the SuperNodes without their node workers (see supernode.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
dir=$(mkdir -p "$1" && cd "$1" && pwd); shift
nodes=2 rounds=3 insecure=0 keep=0 overrides=() node_opts=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) nodes=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --insecure) insecure=1; shift ;;
        --keep) keep=1; shift ;;
        --no-worker) node_opts+=(--no-worker); shift ;;
        *=*) overrides+=("$1"); shift ;;
        *) die "unknown option '$1'" ;;
    esac
done
[[ -e $dir/run ]] && die "$dir/run exists: give a fresh DIR"
repo=$(cd "$here/.." && pwd)
export FLWR_HOME=$dir/flwr-home
port=$(free_port)
stop_all() {
    for ((i = 0; i < nodes; i++)); do "$here/supernode.sh" stop "$dir" "node-$i" >/dev/null; done
    "$here/superlink.sh" stop "$dir" >/dev/null
}
[[ $keep == 1 ]] || trap stop_all EXIT

if [[ $insecure == 1 ]]; then
    "$here/superlink.sh" start "$dir" --insecure --port "$port"
    "$here/connection.sh" loopback "127.0.0.1:$port" --insecure
else
    [[ -e $dir/certs/ca.key ]] || "$here/certs.sh" "$dir/certs"
    "$here/superlink.sh" start "$dir" --certs "$dir/certs" --port "$port"
    "$here/connection.sh" loopback "127.0.0.1:$port" --ca "$dir/certs/ca.crt"
fi
# The nodes share this machine's cores, as simulated clients share them under Ray: each gets
# its share of torch threads rather than all of them (which would oversubscribe the cores).
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nodes > 0 ? cores / nodes : 1 ))}
export_args=()  # the run's data settings shape the partitions, as they would in a simulation
for kv in "${overrides[@]:-}"; do
    case ${kv%%=*} in
        dataset|text-column|label-column|test-fraction|partitioning|dirichlet-alpha|max-train-examples|seed)
            export_args+=("--${kv%%=*}" "$(echo "${kv#*=}" | tr -d '"')") ;;
    esac
done
mkdir -p "$dir/ledgers"
for ((i = 0; i < nodes; i++)); do
    [[ -d $dir/data/node-$i ]] || "${bin}fedortho" export-partition --partition-id "$i" --num-partitions "$nodes" \
        --to "$dir/data/node-$i" "${export_args[@]}"
    node=(--superlink "127.0.0.1:$port" --partition "$i" --partitions "$nodes" --data-path "$dir/data/node-$i"
          --ledger "$dir/ledgers/node-$i.json" "${node_opts[@]}")
    if [[ $insecure == 1 ]]; then
        "$here/supernode.sh" start "$dir" "node-$i" "${node[@]}" --insecure
    else
        [[ -e $dir/keys/node-$i ]] || "$here/node-key.sh" "$dir/keys" "node-$i"
        "${bin}flwr" supernode register "$dir/keys/node-$i.pub" loopback >/dev/null
        "$here/supernode.sh" start "$dir" "node-$i" "${node[@]}" --ca "$dir/certs/ca.crt" --key "$dir/keys/node-$i"
    fi
done
settings="clients=$nodes clients-per-round=$nodes rounds=$rounds out=\"$dir/run\" ${overrides[*]:-}"
echo "loopback: flwr run $repo loopback --run-config '$settings'"
(cd "$dir" && "${bin}flwr" run "$repo" loopback --stream --run-config "$settings")
[[ -f $dir/run/summary.json ]] || die "the run wrote no summary (SuperLink log: $dir/superlink.log)"
echo "loopback: done; run folder $dir/run"
