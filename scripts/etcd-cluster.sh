#!/usr/bin/env bash
# Run the demo's three-member etcd cluster as local processes, for machines without a Docker engine.
#
#   scripts/etcd-cluster.sh start  [DIR]   # fresh cluster; prints ETCD_ENDPOINTS=... on stdout when ready
#   scripts/etcd-cluster.sh status [DIR]   # health of each member; exit 1 unless all three are healthy
#   scripts/etcd-cluster.sh stop   [DIR]   # SIGTERM, bounded wait, SIGKILL leftovers; safe to repeat
#
# DIR (default: .demo/etcd in the repository) holds each member's data dir nI/, log nI.log and pid
# file nI.pid. The members listen on the client ports docker-compose.yml publishes (23791-23793), with
# peers on 23801-23803, so clients use the same ETCD_ENDPOINTS whichever way the cluster was started.
# Only the ETCD_ENDPOINTS line goes to stdout, so a caller can capture it:
#   endpoints=$(scripts/etcd-cluster.sh start | sed -n 's/^ETCD_ENDPOINTS=//p')
#
# The etcd binary is $ETCD_BIN, else `etcd` on PATH
# (Debian/Ubuntu: sudo apt-get install -y etcd-server etcd-client).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly DEFAULT_DIR="$REPO_ROOT/.demo/etcd"
readonly MEMBERS=(1 2 3)
# A new token for every start: etcd derives the cluster id from it, and clients tell a cluster
# rebuilt from scratch by its new id (a fixed token would give the rebuilt cluster the old id).
CLUSTER_TOKEN="etcd-grpc-discovery-demo-$(date +%s)-$$"
readonly CLUSTER_TOKEN
# On loopback the cluster is healthy 0.5-3 s after launch (raft's randomised election); 20 s leaves
# room for a loaded CI machine.
readonly READY_TIMEOUT_S=20
readonly STOP_TIMEOUT_S=5
readonly POLL_INTERVAL_S=0.1

client_port() { echo $((23790 + $1)); }
peer_port() { echo $((23800 + $1)); }
client_url() { echo "http://127.0.0.1:$(client_port "$1")"; }
peer_url() { echo "http://127.0.0.1:$(peer_port "$1")"; }

log() { printf 'etcd-cluster: %s\n' "$*" >&2; }

usage() {
	cat >&2 <<EOF
usage: $0 {start|stop|status} [DIR]

  start   remove old data under DIR, start three etcd members, wait until all are healthy
  stop    stop the members whose pid files are in DIR (no error if none are running)
  status  print the health of each member

DIR defaults to $DEFAULT_DIR.
EOF
}

# The etcd binary, or a message naming the install command and exit 1.
find_etcd() {
	local bin=${ETCD_BIN:-etcd}
	if ! command -v "$bin" >/dev/null 2>&1; then
		log "etcd not found: ETCD_BIN is ${ETCD_BIN:-unset} and there is no etcd on PATH."
		log "install it with:  sudo apt-get install -y etcd-server etcd-client   (Debian/Ubuntu)"
		log "or point ETCD_BIN at an etcd binary."
		exit 1
	fi
	command -v "$bin"
}

# True if something accepts connections on 127.0.0.1:PORT. Binding 0.0.0.0 also counts, which is what
# we want: either would make etcd's bind fail. Loopback refuses at once, so this cannot hang.
port_in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True if the member on PORT answers its /health endpoint with "health":"true", i.e. it sees a leader
# and can serve requests. Plain bash, so readiness polls need neither curl nor etcdctl, and `read -t`
# bounds a member that accepts the connection but never answers.
member_healthy() {
	local port=$1
	(
		exec 3<>"/dev/tcp/127.0.0.1/$port"
		printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$port" >&3
		reply=''
		# HTTP/1.0: the server closes the connection after the reply, so read to EOF (read's status is
		# then non-zero by design, hence `|| true`).
		IFS= read -r -t 2 -d '' reply <&3 || true
		[[ $reply == *'"health":"true"'* ]]
	) 2>/dev/null
}

# True if PID exists and has not exited. A zombie (a member that died while still our child, during
# `start`) has released its ports and counts as gone.
process_alive() {
	local state
	state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
	[[ $state != Z* ]]
}

# The pid in DIR/nI.pid if that process is alive and is member I of *this* DIR. Checking the command
# line guards against a stale pid file whose number the kernel has since given to another process.
member_pid() {
	local dir=$1 i=$2 pid args
	[[ -r $dir/n$i.pid ]] || return 1
	read -r pid <"$dir/n$i.pid" || return 1
	[[ $pid =~ ^[0-9]+$ ]] && process_alive "$pid" || return 1
	args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
	[[ $args == *"--data-dir $dir/n$i "* ]] || return 1
	echo "$pid"
}

# Absolute form of DIR, so pid checks and log paths do not depend on the caller's working directory.
# Doubled slashes are squeezed out: etcd reads a --log-outputs path starting with "//" as a file URL
# with a host and refuses to start (this happens when the repository root is "/").
abs_dir() {
	local dir=$1
	[[ $dir == /* ]] || dir=$PWD/$dir
	while [[ $dir == *//* ]]; do dir=${dir//\/\//\/}; done
	[[ $dir == / ]] || dir=${dir%/}
	echo "$dir"
}

# SIGTERM the given pids one at a time, all within STOP_TIMEOUT_S, then SIGKILL whatever is left.
# One at a time, because a leader that gets SIGTERM first hands leadership to a peer; if that peer is
# shutting down at the same moment, the hand-off hangs until etcd's request timeout (about 7 s, seen
# here with etcd 3.4). Stopped in turn, each hand-off lands in milliseconds.
terminate() {
	local deadline=$((SECONDS + STOP_TIMEOUT_S)) pid
	for pid in "$@"; do
		kill -TERM "$pid" 2>/dev/null || continue
		while process_alive "$pid" && ((SECONDS < deadline)); do
			sleep "$POLL_INTERVAL_S"
		done
	done
	for pid in "$@"; do
		if process_alive "$pid"; then
			log "pid $pid still running ${STOP_TIMEOUT_S}s after SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	done
}

stop_members() {
	local dir=$1 i pid pids=()
	for i in "${MEMBERS[@]}"; do
		if pid=$(member_pid "$dir" "$i"); then pids+=("$pid"); fi
	done
	if ((${#pids[@]} == 0)); then
		log "no member running under $dir"
	else
		log "stopping members (pids ${pids[*]})"
		terminate "${pids[@]}"
	fi
	for i in "${MEMBERS[@]}"; do
		rm -f "$dir/n$i.pid"
	done
}

print_log_tails() {
	local dir=$1 i
	for i in "${MEMBERS[@]}"; do
		log "---- last lines of $dir/n$i.log ----"
		tail -n 20 "$dir/n$i.log" >&2 2>/dev/null || log "(no log)"
	done
}

# Undo a failed `start`: stop the members it forked (DIR then PIDS...) and drop their pid files.
abort_start() {
	local dir=$1 i
	shift
	log "stopping the members this start launched (pids $*)"
	terminate "$@"
	for i in "${MEMBERS[@]}"; do
		rm -f "$dir/n$i.pid"
	done
}

cmd_start() {
	local dir=$1 etcd i port busy=() initial_cluster='' endpoints='' started=()
	etcd=$(find_etcd)

	for i in "${MEMBERS[@]}"; do
		for port in "$(client_port "$i")" "$(peer_port "$i")"; do
			if port_in_use "$port"; then busy+=("$port"); fi
		done
	done
	if ((${#busy[@]} > 0)); then
		log "already in use: port ${busy[*]}. Is another etcd cluster running? Stop it first:"
		log "  $0 stop [DIR]        if this script started it"
		log "  docker compose down  if docker-compose.yml did"
		log "  ss -ltnp 'sport = :${busy[0]}'  shows which process holds the port otherwise"
		exit 1
	fi

	# A demo cluster starts fresh: stale members from a previous run would rejoin under the old
	# cluster ID. Remove only the files this script creates, never DIR itself.
	mkdir -p "$dir"
	for i in "${MEMBERS[@]}"; do
		rm -rf "${dir:?}/n$i" "$dir/n$i.log" "$dir/n$i.pid"
		initial_cluster+="${initial_cluster:+,}n$i=$(peer_url "$i")"
		endpoints+="${endpoints:+,}$(client_url "$i")"
	done

	# Ctrl-C while waiting must not leave half a cluster behind.
	trap 'abort_start "$dir" "${started[@]}"; exit 130' INT
	trap 'abort_start "$dir" "${started[@]}"; exit 143' TERM

	# Job control gives each member its own process group, so Ctrl-C in the terminal does not reach
	# them: `stop` (start.sh calls it from its trap) is then the only thing that shuts them down. Without
	# it, all three get SIGINT at once and the leader's hand-off to a peer that is also exiting hangs
	# (see terminate), so every Ctrl-C of the demo took 5 s and ended in SIGKILL.
	set -m
	for i in "${MEMBERS[@]}"; do
		# SC2094 is a false positive: etcd only appends to its log, it never reads it.
		# shellcheck disable=SC2094
		(
			# etcd reads every ETCD_* variable as a flag (ETCD_DATA_DIR, ETCD_INITIAL_CLUSTER...). Drop
			# the caller's, so ETCD_BIN or ETCD_ENDPOINTS in the environment cannot change a member.
			while read -r name; do
				if [[ $name == ETCD_* ]]; then unset "$name"; fi
			done < <(compgen -e)
			# stdout/stderr go to the same log (both append), so a flag error or a Go panic, which zap
			# never sees, is in the file too.
			exec "$etcd" \
				--name "n$i" \
				--data-dir "$dir/n$i" \
				--listen-client-urls "$(client_url "$i")" \
				--advertise-client-urls "$(client_url "$i")" \
				--listen-peer-urls "$(peer_url "$i")" \
				--initial-advertise-peer-urls "$(peer_url "$i")" \
				--initial-cluster "$initial_cluster" \
				--initial-cluster-token "$CLUSTER_TOKEN" \
				--initial-cluster-state new \
				--logger zap \
				--log-outputs "$dir/n$i.log"
		) </dev/null >>"$dir/n$i.log" 2>&1 &
		started+=("$!")
		echo "$!" >"$dir/n$i.pid"
	done
	set +m
	log "started n1..n3 (logs and data under $dir); waiting up to ${READY_TIMEOUT_S}s for health"

	local deadline=$((SECONDS + READY_TIMEOUT_S)) pending=("${MEMBERS[@]}")
	while ((${#pending[@]} > 0)); do
		local still=()
		for i in "${pending[@]}"; do
			member_healthy "$(client_port "$i")" && continue
			# Our own child, so its pid is trusted as is (member_pid's command-line check would race
			# with the fork: until `exec`, the child still looks like this script).
			if ! process_alive "${started[i - 1]}"; then
				log "n$i exited during startup"
				print_log_tails "$dir"
				abort_start "$dir" "${started[@]}"
				exit 1
			fi
			still+=("$i")
		done
		pending=("${still[@]}")
		((${#pending[@]} > 0)) || break
		if ((SECONDS >= deadline)); then
			log "timed out after ${READY_TIMEOUT_S}s; not healthy: ${pending[*]/#/n}"
			print_log_tails "$dir"
			abort_start "$dir" "${started[@]}"
			exit 1
		fi
		sleep "$POLL_INTERVAL_S"
	done
	trap - INT TERM

	log "cluster healthy; stop it with: $0 stop${2:+ $(printf '%q' "$dir")}"
	echo "ETCD_ENDPOINTS=$endpoints"
}

cmd_status() {
	local dir=$1 i pid state healthy=0 live=()
	for i in "${MEMBERS[@]}"; do
		pid=$(member_pid "$dir" "$i") || pid='-'
		if member_healthy "$(client_port "$i")"; then
			state=healthy
			healthy=$((healthy + 1))
			live+=("$(client_url "$i")")
		elif port_in_use "$(client_port "$i")"; then
			state=unhealthy
		else
			state=down
		fi
		printf 'n%s  %s  pid %-8s %s\n' "$i" "$(client_url "$i")" "$pid" "$state"
	done
	# Leader and raft term, when etcdctl is at hand. Only live endpoints: etcdctl fails as a whole if
	# any listed endpoint is down.
	if ((${#live[@]} > 0)) && command -v etcdctl >/dev/null 2>&1; then
		local IFS=,
		etcdctl --endpoints="${live[*]}" --dial-timeout=1s --command-timeout=2s \
			endpoint status -w table || true
	fi
	((healthy == ${#MEMBERS[@]}))
}

main() {
	if (($# < 1 || $# > 2)); then
		usage
		exit 2
	fi
	local cmd=$1 dir
	dir=$(abs_dir "${2:-$DEFAULT_DIR}")
	case $cmd in
	start) cmd_start "$dir" "${2:-}" ;;
	stop) stop_members "$dir" ;;
	status) cmd_status "$dir" ;;
	-h | --help | help)
		usage
		exit 0
		;;
	*)
		usage
		exit 2
		;;
	esac
}

main "$@"
