#!/usr/bin/env bash
# Make a SuperNode's authentication key pair.
#
#   deploy/node-key.sh DIR NAME
#
# Writes DIR/NAME (private: stays on the node) and DIR/NAME.pub (register it at the SuperLink
# with `flwr supernode register DIR/NAME.pub <connection>`). ECDSA P-384, as Flower expects.
set -euo pipefail
if [[ $# -ne 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2
fi
dir=$1 name=$2
command -v ssh-keygen >/dev/null || { echo "node-key.sh: ssh-keygen is not installed (openssh-client)" >&2; exit 1; }
mkdir -p "$dir"
if [[ -e $dir/$name ]]; then echo "node-key.sh: $dir/$name exists; refusing to overwrite it" >&2; exit 1; fi
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedortho-$name" -f "$dir/$name"
echo "node-key.sh: private key $dir/$name, public key $dir/$name.pub"
