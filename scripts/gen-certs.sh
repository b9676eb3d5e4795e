#!/usr/bin/env bash
# Generates a throwaway CA and certificates for the secure demo (docker-compose.secure.yml, TLS
# between client and server):
#
#   scripts/gen-certs.sh [DIR]        # default DIR: certs
#
# DIR/ca.pem, DIR/server.pem + server-key.pem (valid for 127.0.0.1, ::1, localhost, etcd1-3; usable
# as a client certificate too, as etcd's members need), DIR/client.pem + client-key.pem. Needs openssl.
# For development only: the CA key is left in DIR.
set -euo pipefail

dir=${1:-certs}
command -v openssl >/dev/null || {
	echo "gen-certs.sh: openssl is needed (Debian: apt-get install openssl)" >&2
	exit 1
}
mkdir -p "$dir"
cd "$dir"
ext=$(mktemp)
trap 'rm -f "$ext" ./*.csr ./*.srl' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
	-subj "/CN=grpc-discovery demo CA" -keyout ca-key.pem -out ca.pem 2>/dev/null

leaf() { # name usage
	printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=%s\nsubjectAltName=DNS:localhost,DNS:etcd1,DNS:etcd2,DNS:etcd3,IP:127.0.0.1,IP:::1\n' "$2" >"$ext"
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
		-keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
	openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
		-extfile "$ext" -out "$1.pem" 2>/dev/null
}
leaf server serverAuth,clientAuth
leaf client clientAuth
chmod 600 ./*-key.pem
echo "wrote $(pwd)/{ca,server,server-key,client,client-key}.pem"
