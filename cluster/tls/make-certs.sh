#!/usr/bin/env bash
# Create a private certificate authority and one certificate per dask role (scheduler, worker,
# client), signed by it, for a cwtflow cluster that talks TLS over a network.
#
#   cluster/tls/make-certs.sh DIR [HOST ...]
#
# DIR receives ca.pem (the CA certificate everybody trusts), ca.key (keep it offline: it signs
# new certificates), and scheduler.pem/.key, worker.pem/.key, client.pem/.key. HOST names or IP
# addresses (default: localhost 127.0.0.1) go into the certificates' subjectAltName; dask checks
# the chain against ca.pem, not host names, but other TLS tools may. Certificates are valid
# for DASK_TLS_DAYS days (default 365). Private keys are created readable by their owner only.
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: $0 DIR [HOST ...]" >&2; exit 2; }
DIR="$1"
shift
HOSTS=("$@")
[[ ${#HOSTS[@]} -gt 0 ]] || HOSTS=(localhost 127.0.0.1)
DAYS="${DASK_TLS_DAYS:-365}"
BITS="${DASK_TLS_BITS:-3072}"

san=""
for host in "${HOSTS[@]}"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then
        san+="${san:+,}IP:$host"
    else
        san+="${san:+,}DNS:$host"
    fi
done

umask 077
mkdir -p "$DIR"
openssl req -x509 -newkey "rsa:$BITS" -sha256 -days "$DAYS" -nodes \
    -keyout "$DIR/ca.key" -out "$DIR/ca.pem" -subj "/CN=cwtflow dask CA" 2>/dev/null
extensions="$DIR/extensions.cnf"
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
    "$san" >"$extensions"
for role in scheduler worker client; do
    openssl req -newkey "rsa:$BITS" -sha256 -nodes -keyout "$DIR/$role.key" \
        -out "$DIR/$role.csr" -subj "/CN=cwtflow dask $role" 2>/dev/null
    openssl x509 -req -in "$DIR/$role.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
        -CAcreateserial -days "$DAYS" -sha256 -extfile "$extensions" \
        -out "$DIR/$role.pem" 2>/dev/null
    rm -f "$DIR/$role.csr"
done
rm -f "$extensions" "$DIR/ca.srl"
chmod 644 "$DIR"/*.pem
echo "certificates in $DIR (CA ca.pem; scheduler, worker, client .pem/.key; SAN $san)"
