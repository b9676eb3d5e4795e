#!/usr/bin/env bash
# Turns auth on in a running cluster and adds a user limited to the registry's prefix:
#
#   ROOT_PASSWORD=... GREETER_PASSWORD=... scripts/etcd-auth.sh
#
# Creates `root` (role root) and `greeter` (role `services-rw`: readwrite on services/ only), then
# `auth enable`. Reaches etcd through $ETCD_ENDPOINTS (default: the demo cluster) and trusts $ETCD_CA
# if set. Then run the binaries with ETCD_USERNAME=greeter ETCD_PASSWORD=... (or
# --etcd-password-file). Passwords come from the environment so they stay out of `ps` and history.
set -euo pipefail

: "${ROOT_PASSWORD:?set ROOT_PASSWORD}" "${GREETER_PASSWORD:?set GREETER_PASSWORD}"
endpoints=${ETCD_ENDPOINTS:-127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793}
flags=(--endpoints="$endpoints")
[[ -n ${ETCD_CA:-} ]] && flags+=(--cacert="$ETCD_CA")
ctl() { env -u ETCD_CA -u ETCD_ENDPOINTS -u ETCD_USERNAME -u ETCD_PASSWORD ETCDCTL_API=3 etcdctl "${flags[@]}" "$@"; }

# Right after `docker compose up -d` the members are still electing a leader: wait (bounded) until
# every endpoint reports healthy, so this script can follow `up -d` directly.
deadline=$((SECONDS + ${ETCD_AUTH_WAIT_S:-60}))
until ctl --dial-timeout=2s --command-timeout=3s endpoint health >/dev/null 2>&1; do
	if ((SECONDS >= deadline)); then
		echo "etcd-auth.sh: etcd at $endpoints is not healthy after ${ETCD_AUTH_WAIT_S:-60}s:" >&2
		ctl --dial-timeout=2s --command-timeout=3s endpoint health >&2 || true
		exit 1
	fi
	sleep 0.5
done

ctl role add root
ctl user add root --new-user-password="$ROOT_PASSWORD"
ctl user grant-role root root
ctl role add services-rw
ctl role grant-permission services-rw --prefix=true readwrite services/
ctl user add greeter --new-user-password="$GREETER_PASSWORD"
ctl user grant-role greeter services-rw
ctl auth enable
echo "auth enabled; user greeter may read and write services/ only"
