#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
#
#   ./test.sh                 set up, then cargo test --workspace
#   ./test.sh -p registry     set up, then cargo test --workspace -p registry (any cargo test args)
#   ./test.sh --setup         set up only
#
# Set-up installs only what is missing:
# - Debian packages, with apt-get when this user may (root, or sudo without a password), else it
#   stops and prints the command: etcd and etcdctl (the tests start real clusters), protoc
#   (etcd-client's build script), procps, and the Go peers' toolchain and libraries (Go 1.19,
#   grpc-go, etcd's clientv3 with its naming packages, protoc-gen-go);
# - Python's grpcio, grpcio-tools and grpcio-health-checking for the Python peers, in a virtual
#   environment of the project's own (.venv/), never in the system's Python.
# The tests then run with .venv/bin first on PATH.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
root=$PWD
venv=$root/.venv

have() { command -v "$1" >/dev/null 2>&1; }
note() { printf 'test.sh: %s\n' "$*" >&2; }
die() {
	note "error: $*"
	exit 1
}

# Debian packages: installed when this user may, otherwise the exact command to run.
apt_install() {
	local sudo=()
	have apt-get || die "missing: $*; this is not a Debian-like system: install the equivalents by hand"
	if ((EUID != 0)); then
		if have sudo && sudo -n true 2>/dev/null; then
			sudo=(sudo -n)
		else
			die "missing: $*. Install with:  sudo apt-get update && sudo apt-get install -y $*"
		fi
	fi
	note "installing $*"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

setup() {
	local packages=()
	have "${ETCD_BIN:-etcd}" || packages+=(etcd-server)
	have "${ETCDCTL_BIN:-etcdctl}" || packages+=(etcd-client)
	[[ -n ${PROTOC:-} ]] || have protoc || packages+=(protobuf-compiler)
	have ps || packages+=(procps)
	# The Go interop peers (interop/go/build.sh): GOPATH mode against Debian's Go libraries.
	have go || packages+=(golang-go)
	have protoc-gen-go || packages+=(golang-goprotobuf-dev)
	[[ -d /usr/share/gocode/src/google.golang.org/grpc ]] || packages+=(golang-google-grpc-dev)
	[[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3/naming/resolver ]] || packages+=(golang-etcd-server-dev)
	have python3 || packages+=(python3)
	# Debian splits venv (and the pip it bootstraps) out of python3.
	if have python3 && ! python3 -c "import ensurepip, venv" 2>/dev/null; then
		packages+=(python3-venv)
	fi
	if ((${#packages[@]} > 0)); then
		apt_install "${packages[@]}"
	fi

	# The Python peers' packages, in the project's own environment.
	if ! "$venv/bin/python" -c "import grpc, grpc_tools, grpc_health" 2>/dev/null; then
		note "creating the Python environment $venv (grpcio, grpcio-tools, grpcio-health-checking)"
		python3 -m venv "$venv"
		"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
			grpcio grpcio-tools grpcio-health-checking
	fi
}

if [[ ${1:-} == --setup ]]; then
	setup
	exit 0
fi
setup
export PATH="$venv/bin:$PATH"
exec cargo test --workspace "$@"
