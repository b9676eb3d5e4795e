#!/usr/bin/env bash
# Runs the container fault suite (server/tests/containers.rs) against the docker-compose.yml cluster:
#
#   scripts/container-faults.sh                 # builds the local etcd image if ETCD_IMAGE is unset
#   ETCD_IMAGE=gcr.io/etcd-development/etcd:v3.5.17 scripts/container-faults.sh   # the official one
#
# Needs a Docker engine and compose (v2 `docker compose` or v1 `docker-compose`): without them it
# fails, it does not skip. With ETCD_IMAGE unset it uses the image scripts/build-etcd-image.sh builds
# (no registry needed). Each test is a compose project of its own, removed when the test ends; this
# script also removes, on any exit (a failure, Ctrl-C), whatever a killed test process left: every
# container, network and volume of the projects named with this run's prefix. The FAULT lines are
# the figures docs/RESILIENCE.md reports.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# Unique per run, so the sweep below removes this run's projects and nobody else's.
COMPOSE_TEST_PREFIX="etcdgd-faults-$$"
export COMPOSE_TEST_PREFIX

log() { printf 'container-faults: %s\n' "$*" >&2; }

# The ids (names for volumes, which have no id) of the objects the LIST command shows (docker ps -a,
# network ls, volume ls) that carry a compose project label starting with this run's prefix.
ours() {
	local id='{{.ID}}'
	[[ $2 != volume ]] || id='{{.Name}}'
	"$@" --filter label=com.docker.compose.project --format "$id {{.Label \"com.docker.compose.project\"}}" 2>/dev/null |
		awk -v p="$COMPOSE_TEST_PREFIX-" 'index($2, p) == 1 { print $1 }'
}

# Removes containers, then networks and volumes, of this run's compose projects.
sweep() {
	local ids
	ids=$(ours docker ps --all)
	if [[ -n $ids ]]; then
		log "removing leftover containers: $(paste -sd ' ' - <<<"$ids")"
		xargs docker rm --force --volumes <<<"$ids" >/dev/null || true
	fi
	ids=$(ours docker network ls)
	if [[ -n $ids ]]; then
		log "removing leftover networks: $(paste -sd ' ' - <<<"$ids")"
		xargs docker network rm <<<"$ids" >/dev/null || true
	fi
	ids=$(ours docker volume ls)
	if [[ -n $ids ]]; then
		log "removing leftover volumes: $(paste -sd ' ' - <<<"$ids")"
		xargs docker volume rm --force <<<"$ids" >/dev/null || true
	fi
}

command -v docker >/dev/null 2>&1 || { log "error: docker not found; the container tests need a Docker engine"; exit 1; }
docker info >/dev/null 2>&1 || { log "error: the Docker engine does not answer ('docker info' failed)"; exit 1; }
if [[ -z ${ETCD_IMAGE:-} ]]; then
	ETCD_IMAGE=$("$REPO/scripts/build-etcd-image.sh")
	export ETCD_IMAGE
fi
log "image $ETCD_IMAGE, compose projects $COMPOSE_TEST_PREFIX-*"
trap sweep EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cd "$REPO"
cargo test -p server --test containers -- --ignored --nocapture --test-threads 1
