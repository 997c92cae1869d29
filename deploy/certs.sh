#!/usr/bin/env bash
# Make a certificate authority and a TLS certificate for the SuperLink.
#
#   deploy/certs.sh DIR [HOST ...]
#
# Writes DIR/ca.crt (give it to every SuperNode and to `flwr`), DIR/ca.key (keep it offline),
# DIR/superlink.crt and DIR/superlink.key (the SuperLink's). The certificate is valid for
# localhost, 127.0.0.1 and every HOST given (names or IP addresses the SuperNodes dial).
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2
fi
dir=$1; shift
command -v openssl >/dev/null || { echo "certs.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$dir"
if [[ -e $dir/ca.key ]]; then
    echo "certs.sh: $dir/ca.key exists; refusing to overwrite a certificate authority" >&2; exit 1
fi
umask 077
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done
openssl req -x509 -newkey rsa:4096 -nodes -sha256 -days 3650 -subj "/CN=fedortho deployment CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -sha256 -subj "/CN=fedortho superlink" \
    -keyout "$dir/superlink.key" -out "$dir/superlink.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$dir/superlink.ext"
openssl x509 -req -sha256 -days 825 -in "$dir/superlink.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -extfile "$dir/superlink.ext" -out "$dir/superlink.crt" 2>/dev/null
rm -f "$dir/superlink.csr" "$dir/superlink.ext" "$dir/ca.srl"
chmod 644 "$dir/ca.crt" "$dir/superlink.crt"
echo "certs.sh: CA $dir/ca.crt, SuperLink certificate $dir/superlink.crt for $san"
