#!/usr/bin/env bash
# Checks that the demo and the tests left nothing behind, and names whatever they did:
#
#   scripts/check-leftovers.sh      # exit 1 if anything of this repository's is still there
#
# Looks for: containers, networks and volumes of this repository's compose projects (the demo's,
# the tests', the secure check's); processes running this checkout's binaries or an etcd with its
# data under this checkout; listeners on the demo ports (servers 50051-50053, etcd 23791-23793 and
# peers 23801-23803). Only looks; it stops nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# The compose project names start with one of these (start.sh, testkit, secure-compose.sh).
readonly PROJECTS='^(etcd-grpc-discovery-demo|etcd-grpc-discovery-secure-|etcdgd-)'
found=0
report() {
	printf 'check-leftovers: %s\n' "$*" >&2
	found=1
}

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
	for kind in "ps --all" "network ls" "volume ls"; do
		id='{{.ID}}'
		[[ $kind != volume* ]] || id='{{.Name}}' # volumes have names, no ids
		# shellcheck disable=SC2086 # two words on purpose
		left=$(docker $kind --filter label=com.docker.compose.project \
			--format "{{.Label \"com.docker.compose.project\"}} $id" | grep -E "$PROJECTS" || true)
		[[ -z $left ]] || report "docker $kind: $(paste -sd ',' - <<<"$left")"
	done
fi
for pid in $(pgrep -x etcd || true) $(pgrep -x server || true) $(pgrep -x client || true); do
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
	args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
	if [[ $exe == "$REPO"/* || $args == *"--data-dir $REPO/"* ]]; then
		report "process $pid still running: $args"
	fi
done
for port in 50051 50052 50053 23791 23792 23793 23801 23802 23803; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		report "something still listens on 127.0.0.1:$port (see: ss -ltnp 'sport = :$port')"
	fi
done
if ((found)); then exit 1; fi
echo "check-leftovers: nothing left behind (containers, networks, volumes, processes, ports)"
