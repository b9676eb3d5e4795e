#!/usr/bin/env bash
# Builds a local etcd image for machines that cannot pull the official one (no registry, offline):
#
#   scripts/build-etcd-image.sh                      # builds etcd-grpc-discovery/etcd:3.5.1-local
#   ETCD_IMAGE=etcd-grpc-discovery/etcd:3.5.1-local docker-compose up -d
#
# The image is FROM scratch and holds only the official static etcd 3.5.1 release binaries (from
# scripts/etcd-3.5.sh) at the paths of the official image, /usr/local/bin/etcd and
# /usr/local/bin/etcdctl (plus etcdutl), so docker-compose.yml's exec-form healthcheck and command
# work unchanged. Building it pulls nothing: `FROM scratch` is built in, and the context is a
# temporary directory with just the three binaries. Prints the tag on stdout when done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly TAG=${ETCD_LOCAL_IMAGE:-etcd-grpc-discovery/etcd:3.5.1-local}

log() { printf 'build-etcd-image: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

command -v docker >/dev/null 2>&1 || die "docker not found; install a Docker engine (Debian: apt-get install -y docker.io)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer ('docker info' failed); start it (systemctl start docker) or check your access to its socket"

bins=$("$REPO/scripts/etcd-3.5.sh")
etcd_bin=$(sed -n 's/^ETCD_BIN=//p' <<<"$bins")
bin_dir=$(dirname "$etcd_bin")

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# Hard links when the cache is on the same file system (no 57 MB copy), a copy otherwise.
for name in etcd etcdctl etcdutl; do
	ln "$bin_dir/$name" "$context/$name" 2>/dev/null || cp "$bin_dir/$name" "$context/$name"
done
cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY etcd etcdctl etcdutl /usr/local/bin/
EXPOSE 2379 2380
# CMD, not ENTRYPOINT, as in the official image: docker-compose.yml's command starts with the
# binary's path, which an ENTRYPOINT would receive as its first argument.
CMD ["/usr/local/bin/etcd"]
DOCKERFILE

log "building $TAG from $bin_dir (FROM scratch: nothing is pulled)"
docker build --quiet --tag "$TAG" "$context" >&2 || die "docker build of $TAG failed (its output is above)"
# Proves the binaries run inside the image, not merely that they were copied.
version=$(docker run --rm "$TAG" /usr/local/bin/etcd --version | sed -n 's/^etcd Version: //p')
[[ -n $version ]] || die "the image $TAG was built, but etcd --version does not run inside it"
log "built $TAG (etcd $version)"
echo "$TAG"
