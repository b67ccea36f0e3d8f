#!/bin/sh
# tls.sh OUTDIR IP [IP...]: a private CA, one server certificate for the managers' Docker API
# (every IP as a subjectAltName) and one client certificate for meshd. Idempotent: an
# existing CA is kept. Used by the Vagrant manager and by `cargo xtask lab up`.
set -eu
out=$1
shift
[ $# -ge 1 ] || { echo "usage: tls.sh OUTDIR IP [IP...]" >&2; exit 2; }
mkdir -p "$out"
cd "$out"
[ -f ca.pem ] && [ -f client.pem ] && [ -f server.pem ] && exit 0
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 825 -subj /CN=meshd-lab-ca -out ca.pem
sans=""
for ip in "$@"; do sans="${sans:+$sans,}IP:$ip"; done
sign() { # name cn extensions
  key "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server docker-manager "subjectAltName=$sans,DNS:localhost
extendedKeyUsage=serverAuth"
sign client meshd "extendedKeyUsage=clientAuth"
chmod 0644 ca.pem server.pem client.pem
