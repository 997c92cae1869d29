#!/usr/bin/env bash
# Add a SuperLink connection to Flower's config.toml, so that `flwr run . NAME` submits to it.
#
#   deploy/connection.sh NAME HOST:PORT --ca CA.crt
#   deploy/connection.sh NAME HOST:PORT --insecure
#
# The file is $FLWR_HOME/config.toml ($HOME/.flwr/config.toml without FLWR_HOME). An entry of
# the same name is replaced.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[[ $# -eq 3 || ($# -eq 4 && $3 == --ca) ]] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
name=$1 address=$2
case $3 in
    --ca) [[ -r $4 ]] || die "cannot read $4"; extra="root-certificates = \"$(cd "$(dirname "$4")" && pwd)/$(basename "$4")\"" ;;
    --insecure) extra="insecure = true" ;;
    *) die "unknown option '$3'" ;;
esac
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || die "connection name '$name' may hold only letters, digits, '-' and '_'"
home=${FLWR_HOME:-$HOME/.flwr}
mkdir -p "$home"
toml=$home/config.toml
[[ -f $toml ]] || printf '[superlink]\ndefault = "%s"\n' "$name" > "$toml"
# Drop an earlier entry of this name (its header up to the next header), then append.
awk -v h="[superlink.$name]" '$0 == h {skip = 1; next} /^\[/ {skip = 0} !skip' "$toml" > "$toml.tmp"
printf '\n[superlink.%s]\naddress = "%s"\n%s\n' "$name" "$address" "$extra" >> "$toml.tmp"
mv "$toml.tmp" "$toml"
echo "connection.sh: '$name' -> $address in $toml"
