#!/usr/bin/env bash
# Start or stop a SuperLink.
#
#   deploy/superlink.sh start DIR --certs CERTS [--host H] [--port P] [--database FILE]
#   deploy/superlink.sh start DIR --insecure [--host H] [--port P]   (loopback experiments only)
#   deploy/superlink.sh stop DIR
#
# Secure by default: TLS with CERTS/superlink.crt (from deploy/certs.sh) and SuperNode
# authentication (only keys registered with `flwr supernode register` may connect). One port
# (default 9093) serves the Fleet API (SuperNodes), the Control API (`flwr run`) and the
# Runtime API. H defaults to 127.0.0.1; use 0.0.0.0 to accept SuperNodes from other machines,
# and let the firewall admit only them. Log and pid file go to DIR. No dependencies are
# installed at run time: the ServerApp uses the environment this script runs in.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[[ $# -ge 2 && $1 != -h && $1 != --help ]] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
action=$1 dir=$2; shift 2
pidfile=$dir/superlink.pid log=$dir/superlink.log
case $action in
    stop) stop superlink "$pidfile"; exit 0 ;;
    start) ;;
    *) die "unknown action '$action' (start or stop)" ;;
esac
host=127.0.0.1 port=9093 certs="" insecure=0 database=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --certs) certs=$2; shift 2 ;;
        --insecure) insecure=1; shift ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --database) database=$2; shift 2 ;;
        *) die "unknown option '$1'" ;;
    esac
done
mkdir -p "$dir"
args=(--host "$host" --port "$port" --disable-runtime-dependency-installation)
[[ -n $database ]] && args+=(--database "$database")
if [[ $insecure == 1 ]]; then
    [[ -z $certs ]] || die "--certs and --insecure exclude each other"
    echo "superlink: WARNING: no TLS and no SuperNode authentication: anyone who reaches $host:$port can join or submit runs"
    args+=(--insecure)
else
    [[ -n $certs ]] || die "give --certs DIR (made by deploy/certs.sh), or --insecure for a loopback experiment"
    for f in ca.crt superlink.crt superlink.key; do [[ -r $certs/$f ]] || die "cannot read $certs/$f"; done
    args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/superlink.crt" --ssl-keyfile "$certs/superlink.key"
           --enable-supernode-auth)
fi
start superlink "$pidfile" "$log" "${bin}flower-superlink" "${args[@]}"
probe=$host; [[ $probe == 0.0.0.0 ]] && probe=127.0.0.1
wait_for_port superlink "$(cat "$pidfile")" "$probe" "$port" "$log"
echo "superlink: listening on $host:$port (pid $(cat "$pidfile"), log $log)"
