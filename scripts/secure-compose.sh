#!/usr/bin/env bash
# Brings up the secure demo cluster (docker-compose.yml + docker-compose.secure.yml: TLS and auth)
# with the README's commands, registers a TLS server through it and calls it with the client; then
# removes everything. CI runs it; it is also the README's "secure variant" section, checked:
#
#   scripts/secure-compose.sh        # ETCD_IMAGE as for docker-compose.yml; unset: the local image
#
# The README's commands run as written, with two substitutions: `docker-compose` where only compose
# v1 is installed, and COMPOSE_PROJECT_NAME set to a project of this run's own, so `down -v` at the
# end can only remove what this script created. It needs the demo's ports (etcd 23791-23793, server
# 50051) free, and a built server and client (cargo build -p server -p client). Certificates go to
# certs/ as in the README; the script removes that directory again if it created it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly REGISTER_TIMEOUT_S=30
readonly STOP_TIMEOUT_S=10
COMPOSE_PROJECT_NAME="etcd-grpc-discovery-secure-$$"
export COMPOSE_PROJECT_NAME

log() { printf 'secure-compose: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
# Prints the README command being run, then runs it.
run() {
	printf '$ %s\n' "$*" >&2
	"$@"
}

cd "$REPO"
if docker compose version >/dev/null 2>&1; then
	COMPOSE=(docker compose)
elif docker-compose version >/dev/null 2>&1; then
	COMPOSE=(docker-compose)
else
	die "neither 'docker compose' nor 'docker-compose' works; install one (Debian: apt-get install -y docker-compose)"
fi
docker info >/dev/null 2>&1 || die "the Docker engine does not answer ('docker info' failed)"
for port in 23791 23792 23793 50051; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		die "port $port is in use (a demo still running? see: ss -ltnp 'sport = :$port')"
	fi
done
[[ -x target/debug/server && -x target/debug/client ]] ||
	die "target/debug/server and client are missing; build them: cargo build -p server -p client"
if [[ -z ${ETCD_IMAGE:-} ]]; then
	ETCD_IMAGE=$(scripts/build-etcd-image.sh)
	export ETCD_IMAGE
fi

made_certs=0
[[ -e certs ]] || made_certs=1
server_pid=''
work=$(mktemp -d)
cleanup() {
	local rc=$? deadline
	trap - EXIT
	trap '' INT TERM
	set +e
	if [[ -n $server_pid ]]; then
		kill -TERM "$server_pid" 2>/dev/null
		deadline=$((SECONDS + STOP_TIMEOUT_S))
		while kill -0 "$server_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
		kill -KILL "$server_pid" 2>/dev/null
		wait "$server_pid" 2>/dev/null
	fi
	"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.secure.yml down --volumes --remove-orphans >&2
	((made_certs)) && rm -rf certs
	((rc == 0)) || log "FAILED (exit status $rc); server log: $work/server.log (kept)"
	((rc != 0)) || rm -rf "$work"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Only the README's settings: nothing the caller exported may change what is being checked.
unset ETCD_ENDPOINTS ETCD_CA ETCD_CERT ETCD_KEY ETCD_USERNAME ETCD_PASSWORD ETCD_PASSWORD_FILE \
	REGISTRY_CONFIG TLS_CA TLS_CERT TLS_KEY ETCD1_PORT ETCD2_PORT ETCD3_PORT

log "image $ETCD_IMAGE, compose project $COMPOSE_PROJECT_NAME (${COMPOSE[*]})"
run scripts/gen-certs.sh certs
run "${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.secure.yml up -d
printf '$ export ETCD_CA=certs/ca.pem\n' >&2
export ETCD_CA=certs/ca.pem
printf '$ ROOT_PASSWORD=change-me GREETER_PASSWORD=change-me-too scripts/etcd-auth.sh\n' >&2
ROOT_PASSWORD=change-me GREETER_PASSWORD=change-me-too scripts/etcd-auth.sh
printf '$ export ETCD_USERNAME=greeter ETCD_PASSWORD=change-me-too\n' >&2
export ETCD_USERNAME=greeter ETCD_PASSWORD=change-me-too
printf '$ ./target/debug/server --port 50051 --tls-cert certs/server.pem --tls-key certs/server-key.pem &\n' >&2
./target/debug/server --port 50051 --tls-cert certs/server.pem --tls-key certs/server-key.pem \
	</dev/null >"$work/server.log" 2>&1 &
server_pid=$!
deadline=$((SECONDS + REGISTER_TIMEOUT_S))
until grep -q -F 'registered; clients can now find this instance' "$work/server.log"; do
	if ! kill -0 "$server_pid" 2>/dev/null || ((SECONDS >= deadline)); then
		tail -n 20 "$work/server.log" >&2
		die "the server did not register through the secure cluster within ${REGISTER_TIMEOUT_S}s (or exited)"
	fi
	sleep 0.1
done
log "the server registered over TLS as user greeter"
run ./target/debug/client --tls-ca certs/ca.pem </dev/null | tee "$work/client.log"
read -r total failed < <(awk '$1 == "total" { print $2, $4 }' "$work/client.log") ||
	die "the client printed no closing table"
((total > 0 && failed == 0)) || die "the client made $total calls, $failed failed"
log "OK: $total calls through TLS and auth, 0 failed"
