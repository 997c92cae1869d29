#!/usr/bin/env bash
# Keep trying to bring a SuperNode up (used by supernode.sh; not meant to be called directly).
#
#   run-supernode.sh LOG RETRY_SECONDS flower-supernode ARGS...
#
# The SuperLink refuses to activate a node while it holds an open session for the node's key:
# after a crash it does so until the missed heartbeats close it (about a minute). Flower's
# SuperNode then exits at once; this loop starts it again every 5 s for up to RETRY_SECONDS.
# SIGTERM is passed on to the SuperNode, which then leaves the federation cleanly.
log=$1 retry=$2; shift 2
deadline=$((SECONDS + retry))
child=""
trap '[[ -n $child ]] && kill -TERM "$child" 2>/dev/null; [[ -n $child ]] && wait "$child"; exit 0' TERM INT
while true; do
    "$@" &
    child=$!
    wait "$child"
    code=$?
    child=""
    if [[ $code != 0 ]] && (( SECONDS < deadline )) && \
            tail -n 30 "$log" | grep -q "Failed to initialize the connection to the SuperLink"; then
        echo "supernode: the SuperLink did not accept this node (see above: a key not registered, a certificate" \
             "not trusted, or the node's previous session still open, which closes about a minute after a crash);" \
             "trying again in 5 s, until $((deadline - SECONDS)) s from now"
        sleep 5 &
        wait $!
        continue
    fi
    exit "$code"
done
