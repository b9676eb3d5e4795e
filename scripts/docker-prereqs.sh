#!/usr/bin/env bash
# Gets a machine with a Docker engine ready for the container steps of CI, and prints the etcd
# image to use:
#
#   ETCD_IMAGE=$(scripts/docker-prereqs.sh)
#
# Installs Debian's docker-compose (v1) with apt-get when neither `docker compose` nor
# `docker-compose` works (as root, or with sudo that needs no password); fails if no engine answers
# (it installs no engine: that is the machine's job). The image is $ETCD_IMAGE if set, else the local
# one scripts/build-etcd-image.sh builds (CI machines have no registry). Only the image goes to stdout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf 'docker-prereqs: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
as_root() {
	if ((EUID == 0)); then "$@"; elif sudo -n true 2>/dev/null; then sudo -n "$@"; else die "need root to run: $*"; fi
}

command -v docker >/dev/null 2>&1 || die "no docker CLI; the container steps need a Docker engine (Debian: apt-get install -y docker.io)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer ('docker info' failed); start it (systemctl start docker)"
if docker compose version >/dev/null 2>&1; then
	log "compose: docker compose $(docker compose version --short)"
elif docker-compose version >/dev/null 2>&1; then
	log "compose: docker-compose $(docker-compose version --short)"
else
	log "installing docker-compose (no compose found)"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose >&2
	docker-compose version --short >&2 || die "docker-compose was installed but does not run"
fi
log "engine: docker $(docker version --format '{{.Server.Version}}')"
if [[ -n ${ETCD_IMAGE:-} ]]; then
	docker image inspect "$ETCD_IMAGE" >/dev/null 2>&1 || docker pull --quiet "$ETCD_IMAGE" >&2 ||
		die "ETCD_IMAGE=$ETCD_IMAGE is not here and cannot be pulled; unset it to build the local image"
	echo "$ETCD_IMAGE"
else
	"$REPO/scripts/build-etcd-image.sh"
fi
