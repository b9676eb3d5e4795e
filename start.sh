#!/usr/bin/env bash
# The whole demo of service registration and discovery on etcd, end to end, in one command:
#
#   ./start.sh                # etcd in Docker if an engine answers, else as local processes
#   ./start.sh --local-etcd   # always local etcd processes (same as DEMO_ETCD=local)
#
# 1. Checks cargo, protoc and etcd (or Docker); installs missing Debian packages when allowed to.
# 2. Builds the server and client, starts a three-member etcd cluster and three Greeter servers
#    (ports 50051-50053), each of which registers itself in etcd under a lease.
# 3. Stage 1, round robin: a client discovers the three servers and makes 9 calls, 3 to each.
# 4. Stage 2, failover: while a client calls every 100 ms, server 50052 stops gracefully and comes
#    back; the client drops it and picks it up again without a single failed call.
#
# Every check that fails exits non-zero, so CI runs this script as its end-to-end test. Every wait polls
# a real signal (a log line, a process exit) with a deadline, never a fixed sleep. Whatever was started
# is stopped on exit, on failure and on Ctrl-C. Logs: .demo/logs/ (servers, clients), .demo/etcd/ (local
# etcd).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO
readonly LOG_DIR="$REPO/.demo/logs"
readonly SERVER_PORTS=(50051 50052 50053)
readonly FAILOVER_PORT=50052
# The client ports of the demo cluster, whether docker-compose.yml or scripts/etcd-cluster.sh runs it.
readonly ETCD_PORTS=(23791 23792 23793)
readonly DEMO_ENDPOINTS=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
# Its own compose project, so the demo never adopts (and `down -v` never deletes) a cluster the reader
# started by hand with `docker compose up`.
readonly COMPOSE_PROJECT=etcd-grpc-discovery-demo
# Where the servers register: <namespace>/<service>/ with the binaries' defaults.
readonly SERVICE_PREFIX=services/helloworld/
# The line a server logs once its key is in etcd (server/src/lib.rs).
readonly REGISTERED='registered; clients can now find this instance'

# Deadlines, in seconds: several times what each step takes on a laptop, for loaded CI machines.
readonly REGISTER_TIMEOUT_S=15 # server start to key in etcd: ~50 ms here
readonly ETCD_HEALTH_TIMEOUT_S=60 # containers created to all members healthy
readonly CLIENT_TIMEOUT_S=15 # client start to its 5th call (includes connecting to etcd)
readonly FAILOVER_TIMEOUT_S=10 # each step of stage 2: milliseconds here
readonly STOP_TIMEOUT_S=5 # SIGTERM to exit: 500 ms deregistration grace, then drain
readonly POLL_S=0.1

# cargo resolves a relative CARGO_TARGET_DIR against the directory it runs in: the repository root.
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$REPO/$TARGET_DIR
readonly SERVER_BIN=$TARGET_DIR/debug/server
readonly CLIENT_BIN=$TARGET_DIR/debug/client

# The binaries read these from the environment (see their --help). Leftovers from the reader's shell
# would change instance ids, addresses or keys and break the checks below, so the demo pins them.
unset SERVER_HOST SERVER_PORT SERVER_ADVERTISE_ADDR SERVER_INSTANCE_ID REGISTRY_TTL REGISTRY_SERVICE \
	REGISTRY_NAMESPACE ETCD_TIMEOUT
export ETCD_ENDPOINTS=$DEMO_ENDPOINTS

ETCD_MODE=''      # local | docker, chosen by choose_etcd_mode
# What cleanup must undo. Set *before* each start, so an interruption mid-start still undoes it.
ETCD_STARTED=''   # local | docker
SERVER_PIDS=()    # indexed by port
CLIENT_PID=''
# The background client's log while it runs, and how many of its lines have been shown.
CLIENT_LOG=''
CLIENT_SHOWN=0
SUMMARY=()

say() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
	printf '\nstart.sh: error: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

usage() {
	cat <<EOF
usage: $0 [--local-etcd]

Runs the service discovery demo end to end: an etcd cluster, three servers and a client; first
round robin, then failover while one server stops and comes back. Exits non-zero if a check fails.

  --local-etcd  run etcd as local processes (scripts/etcd-cluster.sh) even when Docker is available;
                the same as DEMO_ETCD=local (DEMO_ETCD=docker insists on Docker)
  -h, --help    show this text

Needs cargo, protoc, and either a Docker engine with compose or etcd and etcdctl (Debian/Ubuntu:
apt-get install -y etcd-server etcd-client protobuf-compiler). Logs go to .demo/logs/.
EOF
}

# ---- processes -------------------------------------------------------------------------------------

# True while PID runs. A zombie (exited, not yet reaped by this shell) counts as gone.
alive() {
	local state
	state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
	[[ $state != Z* ]]
}
exited() { ! alive "$1"; }

# SIGTERM every PID, SIGKILL whatever still runs STOP_TIMEOUT_S later, and reap them all.
stop_processes() {
	local pid deadline=$((SECONDS + STOP_TIMEOUT_S))
	(($# > 0)) || return 0
	kill -TERM "$@" 2>/dev/null
	for pid in "$@"; do
		while alive "$pid" && ((SECONDS < deadline)); do sleep "$POLL_S"; done
		if alive "$pid"; then
			note "pid $pid still running ${STOP_TIMEOUT_S}s after SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null
		fi
	done
	wait "$@" 2>/dev/null
}

# True if something accepts connections on 127.0.0.1:PORT. Loopback refuses at once: this cannot hang.
port_in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Polls COMMAND... every POLL_S until it succeeds (status 0) or TIMEOUT_S pass (status 1). Meanwhile
# the background client's new lines are shown, in order with this script's own messages.
wait_until() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		show_client_output
		((SECONDS < deadline)) || return 1
		sleep "$POLL_S"
	done
	show_client_output
}

# ---- prerequisites and etcd ------------------------------------------------------------------------

docker_engine_answers() {
	have docker && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1
}

# Installs Debian packages when this user may (root, or sudo without a password), saying so first;
# otherwise prints the command to run and exits 1.
install_packages() {
	local sudo=()
	if ! have apt-get; then
		die "missing: $*. Install them with your package manager (these are the Debian/Ubuntu package names)."
	fi
	if ((EUID != 0)); then
		if have sudo && sudo -n true 2>/dev/null; then
			sudo=(sudo -n)
		else
			die "missing: $*. Install with:  sudo apt-get update && sudo apt-get install -y $*"
		fi
	fi
	note "installing $*:  ${sudo[*]:+${sudo[*]} }apt-get update && ${sudo[*]:+${sudo[*]} }apt-get install -y $*"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

choose_etcd_mode() {
	local requested=${DEMO_ETCD:-}
	if ((LOCAL_ETCD_FLAG)); then requested=local; fi
	case $requested in
	local) ETCD_MODE=local ;;
	docker)
		docker_engine_answers ||
			die "DEMO_ETCD=docker, but no Docker engine answers ('docker info' or 'docker compose version' failed). Start Docker, or use --local-etcd."
		ETCD_MODE=docker
		;;
	'') if docker_engine_answers; then ETCD_MODE=docker; else ETCD_MODE=local; fi ;;
	*) die "DEMO_ETCD must be 'local' or 'docker', not '$requested'" ;;
	esac
}

# The Debian packages providing the commands the chosen etcd mode needs and this machine lacks.
missing_packages() {
	# etcd-client's build script runs protoc; $PROTOC may name one that is not on PATH.
	if [[ -z ${PROTOC:-} ]] && ! have protoc; then echo protobuf-compiler; fi
	have ps || echo procps # process checks here and in scripts/etcd-cluster.sh
	if [[ $ETCD_MODE == local ]]; then
		have "${ETCD_BIN:-etcd}" || echo etcd-server
		have "${ETCDCTL_BIN:-etcdctl}" || echo etcd-client
	fi
}

check_prerequisites() {
	local packages=()
	if ! have cargo; then
		die "cargo not found. Install Rust with rustup (https://rustup.rs):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
then open a new shell (or run: . \"\$HOME/.cargo/env\") and run $0 again."
	fi
	mapfile -t packages < <(missing_packages)
	if ((${#packages[@]} > 0)); then
		install_packages "${packages[@]}"
		mapfile -t packages < <(missing_packages)
		((${#packages[@]} == 0)) ||
			die "still missing after installing: ${packages[*]} (check PATH, ETCD_BIN, ETCDCTL_BIN, PROTOC)"
	fi

	note "$(cargo --version), $("${PROTOC:-protoc}" --version)"
	if [[ $ETCD_MODE == local ]]; then
		note "etcd $("${ETCD_BIN:-etcd}" --version | sed -n 's/^etcd Version: //p') as local processes"
	else
		note "etcd in Docker ($(docker compose version --short 2>/dev/null || echo compose))"
	fi
}

check_ports_free() {
	local port
	for port in "${SERVER_PORTS[@]}"; do
		if port_in_use "$port"; then
			die "port $port is already in use, and the demo servers need ports ${SERVER_PORTS[*]}. Stop whatever listens there (see: ss -ltnp 'sport = :$port') and run again."
		fi
	done
	for port in "${ETCD_PORTS[@]}"; do
		if port_in_use "$port"; then
			die "port $port (a demo etcd client port) is already in use. Is a demo cluster still running? Stop it with 'scripts/etcd-cluster.sh stop' or 'docker compose -p $COMPOSE_PROJECT down -v' (see: ss -ltnp 'sport = :$port')."
		fi
	done
}

compose() {
	docker compose --project-name "$COMPOSE_PROJECT" --file "$REPO/docker-compose.yml" "$@"
}

# True if the member on PORT answers /health with "health":"true": it sees a leader and can serve.
# Plain bash, so the host needs neither curl nor etcdctl; `read -t` bounds a member that never answers.
etcd_member_healthy() {
	(
		exec 3<>"/dev/tcp/127.0.0.1/$1"
		printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$1" >&3
		reply=''
		IFS= read -r -t 2 -d '' reply <&3 || true # HTTP/1.0: read until the server closes
		[[ $reply == *'"health":"true"'* ]]
	) 2>/dev/null
}

all_etcd_members_healthy() {
	local port
	for port in "${ETCD_PORTS[@]}"; do
		etcd_member_healthy "$port" || return 1
	done
}

start_etcd() {
	if [[ $ETCD_MODE == local ]]; then
		say "Starting etcd, the registry: three members, so it keeps working if one fails (local processes, logs in .demo/etcd/)"
		ETCD_STARTED=local
		# Waits for health itself; its only stdout line is ETCD_ENDPOINTS=..., the same as ours.
		"$REPO/scripts/etcd-cluster.sh" start >/dev/null
	else
		say "Starting etcd, the registry: three members, so it keeps working if one fails (docker compose, project $COMPOSE_PROJECT)"
		ETCD_STARTED=docker
		compose up --detach
		if ! wait_until "$ETCD_HEALTH_TIMEOUT_S" all_etcd_members_healthy; then
			compose ps
			compose logs --tail 20
			die "the etcd containers were not all healthy within ${ETCD_HEALTH_TIMEOUT_S}s"
		fi
	fi
	note "etcd is healthy at $DEMO_ENDPOINTS"
}

# etcdctl against the demo cluster: the host's in local mode, the one inside the image with Docker.
demo_etcdctl() {
	if [[ $ETCD_MODE == local ]]; then
		ETCDCTL_API=3 "${ETCDCTL_BIN:-etcdctl}" --endpoints="$DEMO_ENDPOINTS" \
			--dial-timeout=2s --command-timeout=5s "$@"
	else
		compose exec -T etcd1 /usr/local/bin/etcdctl --command-timeout=5s "$@"
	fi
}

# ---- servers ---------------------------------------------------------------------------------------

server_log() { echo "$LOG_DIR/server-$1.log"; }

# Starts the Greeter server on PORT in the background, appending to its log (a restarted server's lines
# follow those of the instance before it).
start_server() {
	local port=$1
	# info: the script waits for the server's "registered;" line, whatever RUST_LOG the reader has set.
	RUST_LOG=info "$SERVER_BIN" --host 127.0.0.1 --port "$port" \
		</dev/null >>"$(server_log "$port")" 2>&1 &
	SERVER_PIDS[port]=$!
}

# True once the server on PORT has logged its COUNT-th registration; exits if that server has died.
server_registered() {
	local port=$1 count=$2 seen
	seen=$(grep -s -c -F -e "$REGISTERED" "$(server_log "$port")" || true)
	((seen >= count)) && return 0
	if exited "${SERVER_PIDS[port]}"; then
		fail_server "$port" "server $port exited before registering"
	fi
	return 1
}

fail_server() {
	local port=$1
	shift
	printf '\n---- last lines of %s ----\n' "$(server_log "$port")" >&2
	tail -n 20 "$(server_log "$port")" >&2
	die "$*"
}

# Waits until the server on PORT has registered for the COUNT-th time (1, or 2 after a restart).
wait_registered() {
	local port=$1 count=$2
	wait_until "$REGISTER_TIMEOUT_S" server_registered "$port" "$count" ||
		fail_server "$port" "server $port did not register in etcd within ${REGISTER_TIMEOUT_S}s"
}

start_servers() {
	local port
	say "Starting three servers on ports ${SERVER_PORTS[*]}: each listens first, then puts its address in etcd under a lease it keeps alive"
	for port in "${SERVER_PORTS[@]}"; do
		start_server "$port"
	done
	for port in "${SERVER_PORTS[@]}"; do
		wait_registered "$port" 1
		note "server $port registered (log: .demo/logs/server-$port.log)"
	done
	note "what etcd now holds, one key per instance (the value is the Go naming format; the key dies with its lease):"
	demo_etcdctl get --prefix "$SERVICE_PREFIX" | sed 's/^/      /'
}

# ---- the client ------------------------------------------------------------------------------------

# Prints the background client's log lines not shown yet. Complete lines only: `wc -l` counts newlines,
# so a line still being written waits for the next call.
show_client_output() {
	local lines
	[[ -n $CLIENT_LOG && -r $CLIENT_LOG ]] || return 0
	lines=$(wc -l <"$CLIENT_LOG")
	if ((lines > CLIENT_SHOWN)); then
		sed -n "$((CLIENT_SHOWN + 1)),${lines}p" "$CLIENT_LOG"
		CLIENT_SHOWN=$lines
	fi
}

# Counts the successful calls in the client log that ADDR served (any address if empty), after the
# first line containing FROM (from the start if empty) and before the next line containing UNTIL.
count_calls() {
	awk -v addr="$1" -v from="$2" -v until_="${3:-}" '
		BEGIN { inside = (from == "") }
		inside && until_ != "" && index($0, until_) { inside = 0; done = 1 }
		inside && $1 == "call" && $3 != "FAILED" && (addr == "" || $3 == addr) { n++ }
		!inside && !done && index($0, from) { inside = 1 }
		END { print n + 0 }
	' "$CLIENT_LOG"
}

# Exits with the client's output if the background client died before the demo was done with it.
client_still_running() {
	alive "$CLIENT_PID" && return 0
	show_client_output
	die "the client exited early; see $CLIENT_LOG"
}

# True once the client has made MIN calls served by ADDR (or any) since the line containing FROM.
client_calls_at_least() {
	client_still_running
	(($(count_calls "$2" "$3") >= $1))
}

client_log_has() {
	client_still_running
	grep -s -q -F -e "$1" "$CLIENT_LOG"
}

# The client's closing table as "instance=calls ...", sorted.
calls_per_instance() {
	awk '$1 == "instance" && $2 == "address" { table = 1; next }
		$1 == "total" { table = 0 }
		table { print $1 "=" $3 }' "$1" | sort | paste -sd ' ' -
}

stage_round_robin() {
	local log=$LOG_DIR/client-round-robin.log rc=0 served expected='' port
	for port in "${SERVER_PORTS[@]}"; do expected+="${expected:+ }127.0.0.1-$port=3"; done
	say "Stage 1/2, round robin: a client lists the servers in etcd, watches for changes, and sends 9 calls, one server after another"
	note "\$ client --requests 9 --interval 100ms"
	"$CLIENT_BIN" --requests 9 --interval 100ms </dev/null 2>&1 | tee "$log" || rc=$?
	((rc == 0)) || die "stage 1: the client exited with status $rc (output in $log)"
	served=$(calls_per_instance "$log")
	[[ $served == "$expected" ]] ||
		die "stage 1: expected 3 calls served by each instance ($expected), got: ${served:-no table}"
	SUMMARY+=("stage 1, round robin: ok, 9 calls, 3 served by each of the 3 instances")
}

stage_failover() {
	local port=$FAILOVER_PORT rc pid
	local id=127.0.0.1-$FAILOVER_PORT addr=127.0.0.1:$FAILOVER_PORT
	local left="- instance $id left" joined="+ instance $id joined"
	local totals away after

	say "Stage 2/2, failover: a client calls every 100 ms while server $port stops gracefully and comes back; no call may fail"
	# --duration is only an upper bound, longer than all the deadlines below together: the demo stops
	# the client with Ctrl-C as soon as it has seen the instance come back.
	note "\$ client --duration 90s --interval 100ms   (output also in .demo/logs/client-failover.log)"
	CLIENT_LOG=$LOG_DIR/client-failover.log
	CLIENT_SHOWN=0
	"$CLIENT_BIN" --duration 90s --interval 100ms </dev/null >"$CLIENT_LOG" 2>&1 &
	CLIENT_PID=$!
	wait_until "$CLIENT_TIMEOUT_S" client_calls_at_least 5 "" "" ||
		die "stage 2: the client made fewer than 5 calls in ${CLIENT_TIMEOUT_S}s; see $CLIENT_LOG"

	pid=${SERVER_PIDS[port]}
	say "Stopping server $port with SIGTERM: it reports NOT_SERVING, revokes its lease (etcd deletes the key and tells every watcher), serves 500 ms more, drains, exits"
	kill -TERM "$pid"
	wait_until "$FAILOVER_TIMEOUT_S" client_log_has "$left" ||
		die "stage 2: the client did not see $id leave within ${FAILOVER_TIMEOUT_S}s of SIGTERM"
	wait_until "$STOP_TIMEOUT_S" exited "$pid" ||
		fail_server "$port" "server $port still running ${STOP_TIMEOUT_S}s after SIGTERM"
	rc=0
	wait "$pid" || rc=$?
	unset 'SERVER_PIDS[port]'
	((rc == 0)) || fail_server "$port" "server $port exited with status $rc after SIGTERM; expected 0"
	note "server $port exited with status 0"
	wait_until "$FAILOVER_TIMEOUT_S" client_calls_at_least 4 "" "$left" ||
		die "stage 2: the client stopped calling after $id left"
	away=$(count_calls "$addr" "$left")
	((away == 0)) || die "stage 2: $away call(s) went to $addr after the client saw it leave"
	note "calls go to the two remaining servers only"

	say "Starting server $port again: a new lease, the same key; the client's watch sees the PUT and adds it back"
	start_server "$port"
	wait_registered "$port" 2
	wait_until "$FAILOVER_TIMEOUT_S" client_calls_at_least 1 "$addr" "$joined" ||
		die "stage 2: no call reached $addr within ${FAILOVER_TIMEOUT_S}s of it rejoining"

	say "Stopping the client with Ctrl-C (SIGINT): it finishes the call in flight and prints who served what"
	kill -INT "$CLIENT_PID"
	wait_until "$STOP_TIMEOUT_S" exited "$CLIENT_PID" ||
		die "stage 2: the client was still running ${STOP_TIMEOUT_S}s after SIGINT"
	rc=0
	wait "$CLIENT_PID" || rc=$?
	CLIENT_PID=''
	show_client_output
	CLIENT_LOG=''
	((rc == 0)) || die "stage 2: the client exited with status $rc: some calls failed (see $LOG_DIR/client-failover.log)"

	# The whole window, now that the log is complete: nothing went to 50052 between leaving and rejoining.
	CLIENT_LOG=$LOG_DIR/client-failover.log
	away=$(count_calls "$addr" "$left" "$joined")
	after=$(count_calls "$addr" "$joined")
	CLIENT_LOG=''
	((away == 0)) || die "stage 2: $away call(s) went to $addr while it was away"
	totals=$(grep '^total ' "$LOG_DIR/client-failover.log")
	SUMMARY+=("stage 2, failover: ok, ${totals#total }; none went to $port while it was away, $after after it came back; it exited with status 0")
}

# ---- cleanup ---------------------------------------------------------------------------------------

cleanup() {
	local rc=$?
	# Runs once (EXIT only; INT and TERM just exit), and a second Ctrl-C must not cut it short and
	# leave processes behind. Failing steps here must not stop the rest either.
	trap - EXIT
	trap '' INT TERM
	set +e
	show_client_output
	if [[ -n $CLIENT_PID || ${#SERVER_PIDS[@]} -gt 0 || -n $ETCD_STARTED ]]; then
		say "Cleaning up: stopping what the demo started"
	fi
	if [[ -n $CLIENT_PID ]]; then stop_processes "$CLIENT_PID"; fi
	# Servers before etcd: on SIGTERM each revokes its own lease.
	stop_processes "${SERVER_PIDS[@]}"
	case $ETCD_STARTED in
	local) "$REPO/scripts/etcd-cluster.sh" stop 2>&1 | sed 's/^/    /' ;;
	docker) compose down --volumes --remove-orphans ;;
	esac
	if ((rc == 130 || rc == 143)); then
		printf '\nstart.sh: interrupted; everything it started is stopped.%s\n' "${ETCD_STARTED:+ Logs: $LOG_DIR/}" >&2
	elif ((rc != 0)) && [[ -n $ETCD_STARTED ]]; then
		printf '\nstart.sh: FAILED (exit status %s), see the error above. Logs: %s/\n' "$rc" "$LOG_DIR" >&2
	fi
	exit "$rc"
}

# ---- main ------------------------------------------------------------------------------------------

LOCAL_ETCD_FLAG=0
while (($# > 0)); do
	case $1 in
	--local-etcd) LOCAL_ETCD_FLAG=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
	shift
done

cd "$REPO"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

choose_etcd_mode
say "Checking prerequisites: cargo, protoc, and etcd ($ETCD_MODE)"
check_prerequisites
check_ports_free

say "Building the server and client: cargo build -p server -p client"
cargo build -p server -p client || die "the build failed (cargo's output is above)"
demo_started=$SECONDS

mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/server-*.log "$LOG_DIR"/client-*.log
start_etcd
start_servers
stage_round_robin
stage_failover

say "Summary"
for line in "${SUMMARY[@]}"; do note "$line"; done
note "logs: .demo/logs/ (server-<port>.log, client-round-robin.log, client-failover.log)"
if [[ $ETCD_MODE == local ]]; then note "etcd logs: .demo/etcd/n<i>.log"; fi
note "took $((SECONDS - demo_started)) s after the build"
