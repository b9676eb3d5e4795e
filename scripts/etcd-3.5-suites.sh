#!/usr/bin/env bash
# Runs the core, fault and security suites against etcd 3.5 (the official static release binaries,
# fetched by scripts/etcd-3.5.sh), where `cargo test --workspace` runs everything against the etcd on
# PATH (Debian's 3.4.23 in CI):
#
#   scripts/etcd-3.5-suites.sh [extra cargo test args...]
#
# Core: registration, discovery, the shared lease and locks (registry/tests); faults:
# server/tests/faults.rs; security: TLS and auth (registry/tests/security.rs). Every test cluster
# prints its etcd version, which a failing test shows, and so does this script before each suite.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bins=$(scripts/etcd-3.5.sh)
ETCD_BIN=$(sed -n 's/^ETCD_BIN=//p' <<<"$bins")
ETCDCTL_BIN=$(sed -n 's/^ETCDCTL_BIN=//p' <<<"$bins")
export ETCD_BIN ETCDCTL_BIN
version=$("$ETCD_BIN" --version | sed -n 's/^etcd Version: //p')
echo "etcd-3.5-suites: etcd $version ($ETCD_BIN), etcdctl $("$ETCDCTL_BIN" version | sed -n 's/^etcdctl version: //p')"

suite() {
	local package=$1 test=$2
	shift 2
	echo "etcd-3.5-suites: cargo test -p $package --test $test (etcd $version)"
	cargo test -p "$package" --test "$test" "$@" ||
		{
			echo "etcd-3.5-suites: FAILED: $package/$test against etcd $version ($ETCD_BIN)" >&2
			exit 1
		}
}
suite registry registration "$@"
suite registry discovery "$@"
suite registry shared_lease "$@"
suite registry lock "$@"
suite registry security "$@"
suite server faults "$@"
echo "etcd-3.5-suites: all passed against etcd $version"
