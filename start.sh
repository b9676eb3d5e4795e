#!/usr/bin/env bash
# The whole demo of service registration and discovery on etcd, end to end, in one command:
#
#   ./start.sh                 # etcd in Docker if an engine answers, else as local processes
#   ETCD_IMAGE=etcd-grpc-discovery/etcd:3.5.1-local ./start.sh
#                              # Docker with the image scripts/build-etcd-image.sh builds (no registry)
#   ./start.sh --local-etcd    # always local etcd processes (same as DEMO_ETCD=local)
#   ./start.sh --interactive   # stages 1-4, then a live view to break things in by hand
#
# It runs in numbered stages, each announced with what is about to happen and what to look for:
# 1. Checks cargo, protoc and etcd (or Docker); installs missing Debian packages when allowed to.
# 2. Builds the server and client.
# 3. Starts three Greeter servers (ports 50051-50053), then a three-member etcd cluster, the registry.
# 4. Waits for each server to register itself in etcd under a lease.
# 5. Round robin: a client discovers the three servers and makes 9 calls, 3 to each.
# 6. Failover: while a client calls every 100 ms, server 50052 stops gracefully and comes back; the
#    client drops it and picks it up again without a single failed call.
# A summary follows: the calls each instance served in each stage, and what the failover looked like.
#
# --interactive replaces stages 5 and 6 with `client watch`, the live view, in the foreground: it
# first prints commands to try from another terminal (kill, freeze or drain a server, freeze an etcd
# member, add a server) with the real pids, and runs until Ctrl-C.
#
# Docker mode uses `docker compose` (v2) or, if that is missing, `docker-compose` (v1). When the
# engine answers but the compose file's image is neither here nor pullable (no registry), the script
# says so in one line, with the command that builds a local image, and runs local etcd processes.
#
# The binaries run with exactly the demo's settings: from an empty scratch directory (so a server.toml
# or client.toml in the reader's directory is not read) and with an environment of PATH, HOME, TERM
# and LANG only (so exported ETCD_*, TLS_*, SERVER_*, REGISTRY_* variables change nothing).
#
# Every check that fails exits non-zero, so CI runs this script as its end-to-end test. Every wait polls
# a real signal (a log line, a process exit) with a deadline, never a fixed sleep. Whatever was started
# is stopped on exit, on failure and on Ctrl-C. Logs: .demo/logs/ (servers, clients), .demo/etcd/ (local
# etcd).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO
readonly LOG_DIR="$REPO/.demo/logs"
# --interactive's list of things to try, kept for the reader's other terminal.
readonly TRY_FILE="$LOG_DIR/try-this.txt"
# Where scripts/etcd-cluster.sh keeps its members' data, logs and pid files by default.
readonly ETCD_DIR="$REPO/.demo/etcd"
# The binaries' working directory: empty, so they find no config file but the one the demo gives.
readonly RUN_DIR="$REPO/.demo/run"
readonly SERVER_PORTS=(50051 50052 50053)
readonly FAILOVER_PORT=50052
# The client ports of the demo cluster, whether docker-compose.yml or scripts/etcd-cluster.sh runs it.
readonly ETCD_PORTS=(23791 23792 23793)
readonly DEMO_ENDPOINTS=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
# The image scripts/build-etcd-image.sh builds, for machines with no registry to pull from.
readonly LOCAL_IMAGE=etcd-grpc-discovery/etcd:3.5.1-local
# Its own compose project, so the demo never adopts (and `down -v` never deletes) a cluster the reader
# started by hand with `docker compose up`.
readonly COMPOSE_PROJECT=etcd-grpc-discovery-demo
# Where the servers register: <namespace>/<service>/ with the binaries' defaults.
readonly SERVICE_PREFIX=services/helloworld/
# The line a server logs once its key is in etcd (server/src/lib.rs).
readonly REGISTERED='registered; clients can now find this instance'
# The line a server logs once it has bound its port, before it contacts etcd (server/src/lib.rs).
readonly SERVING='serving listen='

# Deadlines, in seconds: several times what each step takes on a laptop, for loaded CI machines.
readonly REGISTER_TIMEOUT_S=15 # server start to key in etcd: ~50 ms here
readonly ETCD_HEALTH_TIMEOUT_S=60 # containers created to all members healthy
readonly CLIENT_TIMEOUT_S=15 # client start to its 5th call (includes connecting to etcd)
readonly FAILOVER_TIMEOUT_S=10 # each step of the failover stage: milliseconds here
readonly STOP_TIMEOUT_S=5 # SIGTERM to exit: 500 ms deregistration grace, then drain
readonly BIND_RETRY_S=70 # a demo port held by another program's connection: TIME_WAIT lasts 60 s
readonly BIND_RETRY_PAUSE_S=0.5
readonly POLL_S=0.1

# cargo resolves a relative CARGO_TARGET_DIR against the directory it runs in: the repository root.
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$REPO/$TARGET_DIR
readonly SERVER_BIN=$TARGET_DIR/debug/server
readonly CLIENT_BIN=$TARGET_DIR/debug/client

# The binaries read settings from the environment and from <binary>.toml in their working directory
# (see their --help). Leftovers from the reader's shell (ETCD_CA, ETCD_USERNAME, TLS_CERT,
# REGISTRY_CONFIG, SERVER_PORT, ...) or a server.toml would change addresses, keys or TLS and break
# the checks below, so every binary runs through demo_exec: an empty environment but for these, in
# the empty RUN_DIR. `env -i` rather than a list of names to unset: a list misses the next setting.
DEMO_ENV=(env -i "PATH=$PATH" "HOME=${HOME:-/}" "ETCD_ENDPOINTS=$DEMO_ENDPOINTS")
[[ -z ${TERM:-} ]] || DEMO_ENV+=("TERM=$TERM")
[[ -z ${LANG:-} ]] || DEMO_ENV+=("LANG=$LANG")
# Replaces the current process by COMMAND... with only the demo's settings, in RUN_DIR. Call it in a
# subshell: `(demo_exec ...)`, a pipeline stage, or `demo_exec ... &`, whose $! is then the binary's
# own pid (a function wrapping its own subshell would put a bash in between, and a SIGTERM to $!
# would not reach the server).
demo_exec() {
	cd "$RUN_DIR" && exec "${DEMO_ENV[@]}" "$@"
}
# docker-compose.yml reads these to move the published ports; the demo's are fixed.
unset ETCD1_PORT ETCD2_PORT ETCD3_PORT

ETCD_MODE=''      # local | docker, chosen by choose_etcd_mode
COMPOSE=()        # `docker compose` or `docker-compose`, chosen by find_compose
ETCD_IMAGE_NAME='' # the image docker-compose.yml runs (ETCD_IMAGE, or the official one)
# What cleanup must undo. Set *before* each start, so an interruption mid-start still undoes it.
ETCD_STARTED=''   # local | docker
SERVER_PIDS=()    # indexed by port
CLIENT_PID=''
SHELL_STDERR=''   # while the live view runs: where this shell's muted stderr went
# The background client's log while it runs, and how many of its lines have been shown.
CLIENT_LOG=''
CLIENT_SHOWN=0
# For the closing summary: one table row per scripted stage, and what the failover looked like.
SUMMARY=()
FAILOVER_SEEN=()

# The run is told in numbered stages, "[3/6] title"; STAGES is 5 with --interactive.
STAGE=0
STAGES=6
STAGE_NAMES=()   # short name of each stage, for the timings in the summary
STAGE_STARTED=() # when each stage began, in microseconds (see now_us)

# Microseconds since the epoch; whole seconds on bash before 5.0, which lacks EPOCHREALTIME. Digits
# only: the decimal separator of EPOCHREALTIME follows the locale.
now_us() {
	if [[ -n ${EPOCHREALTIME:-} ]]; then
		echo "${EPOCHREALTIME//[!0-9]/}"
	else
		echo $((SECONDS * 1000000))
	fi
}
# A duration in microseconds, as seconds with one decimal.
seconds() { printf '%d.%d s' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }

# stage NAME TITLE: starts the next numbered stage.
stage() {
	STAGE=$((STAGE + 1))
	STAGE_NAMES[STAGE]=$1
	STAGE_STARTED[STAGE]=$(now_us)
	printf '\n[%d/%d] %s\n' "$STAGE" "$STAGES" "$2"
}
say() { printf '\n==> %s\n' "$*"; }
note() { printf '      %s\n' "$*"; }
die() {
	printf '\nstart.sh: error: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

usage() {
	cat <<EOF
usage: $0 [--local-etcd] [--interactive]

Runs the service discovery demo end to end: an etcd cluster, three servers and a client; first
round robin, then failover while one server stops and comes back; then a summary. Exits non-zero
if a check fails.

  --local-etcd   run etcd as local processes (scripts/etcd-cluster.sh) even when Docker is available;
                 the same as DEMO_ETCD=local (DEMO_ETCD=docker insists on Docker)
  --interactive  start etcd and the three servers, print commands to try from another terminal
                 (kill, freeze or drain a server, freeze an etcd member, add a server, watch etcd),
                 then run the client's live view until Ctrl-C, which stops everything; needs a
                 terminal
  -h, --help     show this text

Needs cargo, protoc, and either a Docker engine with compose (docker compose or docker-compose) or
etcd and etcdctl (Debian/Ubuntu: apt-get install -y etcd-server etcd-client protobuf-compiler).
ETCD_IMAGE names the etcd image for Docker; with no registry to pull from, build one with
scripts/build-etcd-image.sh and run: ETCD_IMAGE=$LOCAL_IMAGE $0
Logs go to .demo/logs/.
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

# SIGTERM every PID, SIGKILL whatever still runs STOP_TIMEOUT_S later, and reap them all. SIGCONT
# after SIGTERM, as init systems do: a process the reader froze (--interactive suggests kill -STOP)
# acts on SIGTERM only once it runs again, and would otherwise be killed without deregistering.
stop_processes() {
	local pid deadline=$((SECONDS + STOP_TIMEOUT_S))
	(($# > 0)) || return 0
	kill -TERM "$@" 2>/dev/null
	kill -CONT "$@" 2>/dev/null
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

# Picks the compose command: the v2 plugin `docker compose` if present, else v1's `docker-compose`
# (Debian's package). Both read docker-compose.yml the same way and take the same subcommands here.
find_compose() {
	if docker compose version >/dev/null 2>&1; then
		COMPOSE=(docker compose)
	elif have docker-compose && docker-compose version >/dev/null 2>&1; then
		COMPOSE=(docker-compose)
	else
		return 1
	fi
}

docker_engine_answers() {
	have docker && docker info >/dev/null 2>&1 && find_compose
}

# True if the image docker-compose.yml names (after ETCD_IMAGE) is here, or could be pulled now. Asked
# before anything starts, so a machine without a registry gets one clear line instead of compose's
# pull error halfway through.
etcd_image_available() {
	ETCD_IMAGE_NAME=$(compose config 2>/dev/null | sed -n 's/^ *image: *//p' | sort -u | head -n 1)
	[[ -n $ETCD_IMAGE_NAME ]] || die "'${COMPOSE[*]} config' names no image in $REPO/docker-compose.yml"
	docker image inspect "$ETCD_IMAGE_NAME" >/dev/null 2>&1 && return 0
	note "pulling $ETCD_IMAGE_NAME"
	docker pull --quiet "$ETCD_IMAGE_NAME" >/dev/null 2>&1
}

# The one line for a machine that cannot get the image, with the command that builds a local one.
image_missing() {
	echo "etcd image $ETCD_IMAGE_NAME is not here and cannot be pulled (no registry?); build a local one with: scripts/build-etcd-image.sh && ETCD_IMAGE=$LOCAL_IMAGE $0"
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
			die "DEMO_ETCD=docker, but no Docker engine with compose answers ('docker info' failed, or neither 'docker compose version' nor 'docker-compose version' works). Start Docker, or use --local-etcd."
		etcd_image_available || die "$(image_missing)"
		ETCD_MODE=docker
		;;
	'')
		ETCD_MODE=local
		if docker_engine_answers; then
			if etcd_image_available; then
				ETCD_MODE=docker
			else
				printf 'start.sh: %s; using local etcd processes instead.\n' "$(image_missing)" >&2
			fi
		fi
		;;
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
		note "etcd in Docker: image $ETCD_IMAGE_NAME, with ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null)"
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
			die "port $port (a demo etcd client port) is already in use. Is a demo cluster still running? Stop it with 'scripts/etcd-cluster.sh stop' or '${COMPOSE[*]:-docker compose} -p $COMPOSE_PROJECT down -v' (see: ss -ltnp 'sport = :$port')."
		fi
	done
}

compose() {
	"${COMPOSE[@]}" --project-name "$COMPOSE_PROJECT" --file "$REPO/docker-compose.yml" "$@"
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
	stage etcd "Starting three servers, then etcd, the registry: a three-member cluster on 127.0.0.1:${ETCD_PORTS[0]}-${ETCD_PORTS[2]}"
	listen_servers
	note "Three members, so the registry keeps answering (and leases stay alive) when one of them fails."
	if [[ $ETCD_MODE == local ]]; then
		note "As local processes: scripts/etcd-cluster.sh, data and logs in .demo/etcd/."
		ETCD_STARTED=local
		# Waits for health itself; its only stdout line is ETCD_ENDPOINTS=..., the same as ours.
		"$REPO/scripts/etcd-cluster.sh" start >/dev/null
	else
		note "In Docker: docker-compose.yml, as compose project $COMPOSE_PROJECT."
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
		(demo_exec ETCDCTL_API=3 "${ETCDCTL_BIN:-etcdctl}" --endpoints="$DEMO_ENDPOINTS" \
			--dial-timeout=2s --command-timeout=5s "$@")
	else
		compose exec -T etcd1 /usr/local/bin/etcdctl --command-timeout=5s "$@"
	fi
}

# ---- servers ---------------------------------------------------------------------------------------

server_log() { echo "$LOG_DIR/server-$1.log"; }

# Starts the Greeter server on PORT in the background, appending to its log (a restarted server's lines
# follow those of the instance before it). Further arguments go to the server.
start_server() {
	local port=$1
	shift
	# info: the script waits for the server's "registered;" line, whatever RUST_LOG the reader has set.
	demo_exec RUST_LOG=info "$SERVER_BIN" --host 127.0.0.1 --port "$port" "$@" \
		</dev/null >>"$(server_log "$port")" 2>&1 &
	SERVER_PIDS[port]=$!
}

# How many lines of FILE contain TEXT; 0 for a file not written yet.
count_lines() {
	local n
	n=$(grep -s -c -F -e "$1" "$2" || true)
	echo "${n:-0}"
}

# Starts the server on PORT and waits until it has bound its port (its log says "serving"); further
# arguments go to the server. A port that another socket holds for now is tried again for up to
# BIND_RETRY_S: the holder is then a connection of this machine (anything's, not only etcd's) that
# took the port as its source port. It lets go when it closes, or, if it closed first on its side,
# when its TIME_WAIT ends (60 s on Linux; our SO_REUSEADDR does not help against a socket that did
# not set it). Any other exit, or no "serving" line in time, ends the demo with the server's log.
listen_server() {
	local port=$1 log before lines started deadline=$((SECONDS + BIND_RETRY_S)) told=''
	local -r hint="ss -tan 'sport = :$port'"
	shift
	log=$(server_log "$port")
	while :; do
		before=$(count_lines "$SERVING" "$log")
		lines=$(wc -l <"$log" 2>/dev/null || echo 0)
		start_server "$port" "$@"
		started=$SECONDS
		until (($(count_lines "$SERVING" "$log") > before)); do
			if exited "${SERVER_PIDS[port]}"; then
				if ((SECONDS < deadline)) &&
					tail -n +"$((lines + 1))" "$log" | grep -q -F -e "Address already in use"; then
					[[ -n $told ]] || note "port $port is held by another connection's socket for now ($hint); trying again for up to ${BIND_RETRY_S}s"
					told=1
					sleep "$BIND_RETRY_PAUSE_S"
					continue 2
				fi
				server_exited "$port"
			fi
			((SECONDS - started < REGISTER_TIMEOUT_S)) ||
				fail_server "$port" "server $port did not start listening within ${REGISTER_TIMEOUT_S}s"
			sleep "$POLL_S"
		done
		return 0
	done
}

# Starts the three servers and waits until each holds its port, before etcd starts.
#
# Why first: 50051-50053 lie inside Linux's ephemeral port range (32768-60999), from which the kernel
# picks the source port of every outgoing connection. Started after etcd, a server found its port
# taken in 2 of 3 runs in a fresh network namespace: one of etcd's peer connections had 50052 as its
# source port, and bind() fails on a port any socket uses, listening or not. Once bound, a listening
# port is never handed out as a source port, so binding before etcd opens any connection makes the
# documented ports safe from etcd with no system-wide change (reserving the ports with
# net.ipv4.ip_local_reserved_ports would need root and outlive the demo). Another program's outgoing
# connection can still hold one for a moment (seen once in CI, right after the previous step's
# tests); listen_server tries again until it lets go. Each server binds, serves, then keeps trying
# etcd until it answers; --etcd-timeout covers the time etcd takes to come up. Server 50052's restart
# in the failover stage rebinds while the cluster runs, through listen_server too.
listen_servers() {
	local port
	note "The servers first: each binds its port (${SERVER_PORTS[*]}), then waits for etcd to register."
	note "Binding first keeps etcd's own connections off those ports (they lie in the ephemeral range)."
	for port in "${SERVER_PORTS[@]}"; do
		listen_server "$port" --etcd-timeout "$((ETCD_HEALTH_TIMEOUT_S + REGISTER_TIMEOUT_S + 30))s"
	done
	note "servers listening on ${SERVER_PORTS[*]}"
}

# Exits with the reason server PORT stopped; a port someone else holds gets its own message.
server_exited() {
	local port=$1
	if grep -s -q -F -e "Address already in use" "$(server_log "$port")"; then
		fail_server "$port" "server $port cannot bind 127.0.0.1:$port: another socket holds it (a listener, or an outgoing connection that took it as its source port: ports ${SERVER_PORTS[*]} lie in Linux's ephemeral range 32768-60999). Find it with: ss -tanp 'sport = :$port'"
	fi
	fail_server "$port" "server $port exited before registering"
}

# True once the server on PORT has logged its COUNT-th registration; exits if that server has died.
server_registered() {
	local port=$1 count=$2 seen
	seen=$(grep -s -c -F -e "$REGISTERED" "$(server_log "$port")" || true)
	((seen >= count)) && return 0
	if exited "${SERVER_PIDS[port]}"; then server_exited "$port"; fi
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
	stage servers "The three servers on ports ${SERVER_PORTS[*]} register themselves in etcd"
	note "Each listens first (since stage 3), then puts its address in etcd under a lease it keeps alive."
	note "Look for: one key per server below, the value in Go's naming format (so Go clients find them too)."
	for port in "${SERVER_PORTS[@]}"; do
		wait_registered "$port" 1
		note "server $port registered (log: .demo/logs/server-$port.log)"
	done
	note "what etcd now holds, key then value:"
	demo_etcdctl get --prefix "$SERVICE_PREFIX" | sed 's/^/        /'
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

# The calls the instance with id ID served, from the client's closing table in LOG (0 if not listed).
table_calls() {
	awk -v id="$2" '$1 == "instance" && $2 == "address" { table = 1; next }
		$1 == "total" { table = 0 }
		table && $1 == id { n = $3 }
		END { print n + 0 }' "$1"
}

# Adds the summary's row for a stage: LABEL, then the calls each demo server answered and the total and
# failed counts, all read from the closing table in the client's LOG.
summary_row() {
	local row port
	row=$(printf '%-17s' "$1")
	for port in "${SERVER_PORTS[@]}"; do
		row+=$(printf ' %6s' "$(table_calls "$2" "127.0.0.1-$port")")
	done
	row+=$(awk '$1 == "total" { printf " %6s %7s", $2, $4 }' "$2")
	SUMMARY+=("$row")
}

stage_round_robin() {
	local log=$LOG_DIR/client-round-robin.log rc=0 served expected='' port
	for port in "${SERVER_PORTS[@]}"; do expected+="${expected:+ }127.0.0.1-$port=3"; done
	stage "round robin" "Round robin: a client finds the servers in etcd and sends 9 calls, one server after another"
	note "It lists $SERVICE_PREFIX in etcd, watches the prefix for changes, connects to each server."
	note "Look for: a \"found\" line per server, calls to ${SERVER_PORTS[*]} in turn, then 3 each in its table."
	note "\$ client --requests 9 --interval 100ms"
	demo_exec "$CLIENT_BIN" --requests 9 --interval 100ms </dev/null 2>&1 | tee "$log" || rc=$?
	((rc == 0)) || die "round robin: the client exited with status $rc (output in $log)"
	served=$(calls_per_instance "$log")
	[[ $served == "$expected" ]] ||
		die "round robin: expected 3 calls served by each instance ($expected), got: ${served:-no table}"
	summary_row "round robin" "$log"
}

stage_failover() {
	local port=$FAILOVER_PORT rc pid
	local id=127.0.0.1-$FAILOVER_PORT addr=127.0.0.1:$FAILOVER_PORT
	local left="- instance $id left" joined="+ instance $id joined"
	local log=$LOG_DIR/client-failover.log total failed away after before while_away since_back

	stage failover "Failover: server $port stops and comes back while a client calls every 100 ms"
	note "Stopping, it deletes its key before it stops serving, so clients drop it in time; restarted, it is back."
	note "Look for: \"$left\", no call to $port until it has \"joined\" again, and \"0 failed\"."
	# --duration is only an upper bound, longer than all the deadlines below together: the demo stops
	# the client with Ctrl-C as soon as it has seen the instance come back.
	note "\$ client --duration 90s --interval 100ms   (output also in .demo/logs/client-failover.log)"
	CLIENT_LOG=$log
	CLIENT_SHOWN=0
	demo_exec "$CLIENT_BIN" --duration 90s --interval 100ms </dev/null >"$CLIENT_LOG" 2>&1 &
	CLIENT_PID=$!
	wait_until "$CLIENT_TIMEOUT_S" client_calls_at_least 5 "" "" ||
		die "failover: the client made fewer than 5 calls in ${CLIENT_TIMEOUT_S}s; see $CLIENT_LOG"

	pid=${SERVER_PIDS[port]}
	say "kill -TERM $pid: stopping server $port gracefully"
	note "It reports NOT_SERVING, marks its record draining (the client's \"~ ... leaving\" line), and"
	note "revokes its lease: etcd deletes its key and tells every watcher."
	note "Then it serves 500 ms more for calls already on their way to it, drains, and exits."
	kill -TERM "$pid"
	wait_until "$FAILOVER_TIMEOUT_S" client_log_has "$left" ||
		die "failover: the client did not see $id leave within ${FAILOVER_TIMEOUT_S}s of SIGTERM"
	wait_until "$STOP_TIMEOUT_S" exited "$pid" ||
		fail_server "$port" "server $port still running ${STOP_TIMEOUT_S}s after SIGTERM"
	rc=0
	wait "$pid" || rc=$?
	unset 'SERVER_PIDS[port]'
	((rc == 0)) || fail_server "$port" "server $port exited with status $rc after SIGTERM; expected 0"
	note "server $port exited with status 0"
	wait_until "$FAILOVER_TIMEOUT_S" client_calls_at_least 4 "" "$left" ||
		die "failover: the client stopped calling after $id left"
	away=$(count_calls "$addr" "$left")
	((away == 0)) || die "failover: $away call(s) went to $addr after the client saw it leave"
	note "calls go to the two remaining servers only"

	say "Starting server $port again"
	note "A new lease, the same key: the client's watch sees the PUT and puts the server back in rotation."
	listen_server "$port"
	wait_registered "$port" 2
	wait_until "$FAILOVER_TIMEOUT_S" client_calls_at_least 1 "$addr" "$joined" ||
		die "failover: no call reached $addr within ${FAILOVER_TIMEOUT_S}s of it rejoining"

	say "Stopping the client with Ctrl-C (SIGINT): it finishes the call in flight and prints who served what"
	kill -INT "$CLIENT_PID"
	wait_until "$STOP_TIMEOUT_S" exited "$CLIENT_PID" ||
		die "failover: the client was still running ${STOP_TIMEOUT_S}s after SIGINT"
	rc=0
	wait "$CLIENT_PID" || rc=$?
	CLIENT_PID=''
	show_client_output
	CLIENT_LOG=''
	((rc == 0)) || die "failover: the client exited with status $rc: some calls failed (see $log)"

	# The whole window, now that the log is complete: nothing went to 50052 between leaving and rejoining.
	CLIENT_LOG=$log
	away=$(count_calls "$addr" "$left" "$joined")
	after=$(count_calls "$addr" "$joined")
	before=$(count_calls "" "" "$left")
	while_away=$(count_calls "" "$left" "$joined")
	since_back=$(count_calls "" "$joined")
	CLIENT_LOG=''
	((away == 0)) || die "failover: $away call(s) went to $addr while it was away"
	read -r total failed < <(awk '$1 == "total" { print $2, $4 }' "$log") ||
		die "failover: no closing table in $log"
	((failed == 0)) || die "failover: $failed call(s) failed (see $log)"
	summary_row failover "$log"
	FAILOVER_SEEN=(
		"failover seen: $id left after call $before (and exited 0); the $while_away calls while it was away all"
		"went to the other servers; it joined again and served $after of the $since_back calls after; $failed of $total failed."
	)
}

# The closing summary of a scripted run: calls per instance in each stage, the failover, the timings.
summary() {
	local port header line timings='' i end now
	say "Summary: every check passed"
	header=$(printf '%-17s' "calls served by")
	for port in "${SERVER_PORTS[@]}"; do header+=$(printf ' %6s' "$port"); done
	header+=$(printf ' %6s %7s' total failed)
	printf '\n'
	note "$header"
	for line in "${SUMMARY[@]}"; do note "$line"; done
	printf '\n'
	note "round robin seen: each of the ${#SERVER_PORTS[@]} instances served 3 of the 9 calls."
	for line in "${FAILOVER_SEEN[@]}"; do note "$line"; done
	# From stage 3 on: the time the demo itself takes, whatever the build cost.
	now=$(now_us)
	for ((i = 3; i <= STAGE; i++)); do
		end=${STAGE_STARTED[i + 1]:-$now}
		timings+="${timings:+, }${STAGE_NAMES[i]} $(seconds $((end - STAGE_STARTED[i])))"
	done
	note "took $(seconds $((now - STAGE_STARTED[3]))) after the build: $timings"
	note "logs: .demo/logs/ (server-<port>.log, client-round-robin.log, client-failover.log)"
	if [[ $ETCD_MODE == local ]]; then note "etcd logs: .demo/etcd/n<i>.log"; fi
}

# ---- --interactive ---------------------------------------------------------------------------------

# The things to try from another terminal, with this run's pids and paths, ready to paste.
try_list() {
	local killed=$FAILOVER_PORT frozen=${SERVER_PORTS[2]} drained=${SERVER_PORTS[0]}
	local member_step member_away member_back etcd_watch project
	if [[ $ETCD_MODE == local ]]; then
		member_step="Freeze etcd member n1, then resume it;"
		member_away="kill -STOP \$(cat $(printf %q "$ETCD_DIR/n1.pid"))"
		member_back="kill -CONT \$(cat $(printf %q "$ETCD_DIR/n1.pid"))"
		etcd_watch="ETCDCTL_API=3 $(printf %q "${ETCDCTL_BIN:-etcdctl}") --endpoints=$DEMO_ENDPOINTS watch --prefix services/"
	else
		member_step="Stop etcd member etcd2, then start it again;"
		project="${COMPOSE[*]} -p $COMPOSE_PROJECT -f $(printf %q "$REPO/docker-compose.yml")"
		member_away="$project stop etcd2"
		member_back="$project start etcd2"
		etcd_watch="$project exec etcd1 /usr/local/bin/etcdctl watch --prefix services/"
	fi
	cat <<EOF
In ANOTHER terminal, try these and watch the view react (this list is also in ${TRY_FILE#"$REPO"/}):

1. Kill server $killed hard: out of rotation at once, but its key stays until its lease expires (10 s):
     kill -9 ${SERVER_PIDS[killed]}
2. Freeze server $frozen (out of rotation within ~2 s, when a ping goes unanswered), then resume it:
     kill -STOP ${SERVER_PIDS[frozen]}
     kill -CONT ${SERVER_PIDS[frozen]}
3. Flip the health of server $drained: NOT_SERVING, still registered but out of rotation; again to undo:
     kill -USR1 ${SERVER_PIDS[drained]}
4. $member_step two members keep a quorum, so nothing stops:
     $member_away
     $member_back
5. Start a fourth server (or $killed again after 1). It is yours, not the demo's: stop it with Ctrl-C
   in its terminal (it deregisters), best before you stop the demo:
     ETCD_ENDPOINTS=$DEMO_ENDPOINTS $(printf %q "$SERVER_BIN") --port 50054
6. Watch etcd itself, every put and delete under services/:
     $etcd_watch

Ctrl-C in THIS terminal stops the view; the demo then stops its three servers and etcd.
EOF
}

# --interactive: the things to try, then `client watch` in the foreground until the reader's Ctrl-C.
stage_live_view() {
	local rc=0 interrupted=0
	stage "live view" "The live view: a client calls every 200 ms and shows what it sees, until you press Ctrl-C"
	note "Per server: in rotation or not (and why), calls, errors; below, the latest events."
	try_list >"$TRY_FILE"
	printf '\n'
	sed 's/^/      /' "$TRY_FILE"
	# The view redraws the whole screen, so the list would vanish at once: let the reader take it in
	# first. No terminal on stdin, no one to press Enter: go straight on.
	if [[ -t 0 ]]; then
		printf '\n      Press Enter to open the live view (it redraws this whole screen) '
		read -r _ || true
	fi

	# Ctrl-C signals the terminal's whole foreground process group. The client, in the foreground,
	# handles it: stops calling, prints its table and exits. This shell only notes it (a trap with a
	# command, not '', so the client starts with the default action and installs its own handler),
	# then returns normally: the EXIT trap stops servers and etcd, and the run exits 0.
	# Meanwhile this shell's stderr is muted: when the client ends, bash would report the server the
	# reader killed with -9 as "start.sh: line N: PID Killed ...", which the view has shown already.
	trap 'interrupted=1' INT
	exec {SHELL_STDERR}>&2 2>/dev/null
	(demo_exec "$CLIENT_BIN" --interval 200ms watch 2>&"$SHELL_STDERR") || rc=$?
	exec 2>&"$SHELL_STDERR" {SHELL_STDERR}>&-
	SHELL_STDERR=''
	trap 'exit 130' INT
	if ((!interrupted)); then
		die "the live view's client exited with status $rc before Ctrl-C (its error is above)"
	fi
	# 130: killed by the SIGINT before its handler was installed. 1: a call failed during the session
	# (say, every instance was out of rotation for a moment); the reader's experiment, not a demo failure.
	if ((rc != 0 && rc != 130)); then
		note "the client exited with status $rc: some calls failed or it hit an error (see above)."
	fi
}

# ---- cleanup ---------------------------------------------------------------------------------------

# Sends SIGCONT to the local etcd members (each pid checked against its data dir, as
# scripts/etcd-cluster.sh does). The reader may have frozen one (--interactive suggests it), and a
# stopped member acts on SIGTERM only once it runs again: `stop` would wait out its deadline, then
# SIGKILL the whole cluster.
resume_etcd_members() {
	local i pid
	for i in 1 2 3; do
		pid=$(cat "$ETCD_DIR/n$i.pid" 2>/dev/null) || continue
		if [[ $pid =~ ^[0-9]+$ && $(ps -o args= -p "$pid" 2>/dev/null) == *"--data-dir $ETCD_DIR/n$i "* ]]; then
			kill -CONT "$pid" 2>/dev/null
		fi
	done
}

# Runs COMMAND... in a process group of its own and waits for it. A Ctrl-C pressed meanwhile signals
# only the terminal's foreground group, so it cannot cut the command short; the ignored SIGINT that
# cleanup passes on is not enough for programs that install their own handler, as docker compose does.
shielded() {
	local pid rc=0
	set -m
	"$@" </dev/null &
	pid=$!
	set +m
	wait "$pid" || rc=$?
	return "$rc"
}

cleanup() {
	local rc=$?
	# Runs once (EXIT only; INT, TERM and HUP just exit), and a second Ctrl-C must not cut it short and
	# leave processes behind. Failing steps here must not stop the rest either.
	trap - EXIT
	trap '' INT TERM HUP
	set +e
	# A SIGTERM or SIGHUP that ended the live view arrives while this shell's stderr is muted.
	if [[ -n $SHELL_STDERR ]]; then exec 2>&"$SHELL_STDERR"; fi
	show_client_output
	if [[ -n $CLIENT_PID || ${#SERVER_PIDS[@]} -gt 0 || -n $ETCD_STARTED ]]; then
		say "Cleaning up: stopping what the demo started"
	fi
	if [[ -n $CLIENT_PID ]]; then stop_processes "$CLIENT_PID"; fi
	# Servers before etcd: on SIGTERM each revokes its own lease.
	stop_processes "${SERVER_PIDS[@]}"
	case $ETCD_STARTED in
	local)
		resume_etcd_members
		"$REPO/scripts/etcd-cluster.sh" stop 2>&1 | sed 's/^/      /'
		;;
	docker) shielded compose down --volumes --remove-orphans ;;
	esac
	if ((rc == 129 || rc == 130 || rc == 143)); then
		printf '\nstart.sh: interrupted; everything it started is stopped.%s\n' "${ETCD_STARTED:+ Logs: $LOG_DIR/}" >&2
	elif ((rc != 0)) && [[ -n $ETCD_STARTED ]]; then
		printf '\nstart.sh: FAILED (exit status %s), see the error above. Logs: %s/\n' "$rc" "$LOG_DIR" >&2
	fi
	exit "$rc"
}

# ---- main ------------------------------------------------------------------------------------------

LOCAL_ETCD_FLAG=0
INTERACTIVE=0
while (($# > 0)); do
	case $1 in
	--local-etcd) LOCAL_ETCD_FLAG=1 ;;
	--interactive) INTERACTIVE=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		printf 'start.sh: unknown option: %s\n\n' "$1" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done
if ((INTERACTIVE)); then
	if [[ ! -t 1 ]]; then
		printf 'start.sh: --interactive needs a terminal on stdout: its live view redraws the screen in place.\n' >&2
		printf 'Run it in a terminal, or without --interactive for the scripted demo.\n' >&2
		exit 2
	fi
	STAGES=5
fi

cd "$REPO"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The terminal closing (or `tmux kill-session`) must clean up too.
trap 'exit 129' HUP

choose_etcd_mode
if [[ $ETCD_MODE == local ]]; then etcd_how="local processes"; else etcd_how="in Docker"; fi
stage prerequisites "Checking prerequisites: cargo and protoc to build, etcd ($etcd_how) for the registry"
note "Missing Debian packages are installed with apt-get when this user may (root or passwordless sudo)."
check_prerequisites
check_ports_free

stage build "Building the server and client: cargo build -p server -p client"
note "Quick when nothing changed; a first build compiles every dependency and takes a few minutes."
cargo build -p server -p client || die "the build failed (cargo's output is above)"

mkdir -p "$LOG_DIR"
# Emptied on every run: nothing the reader left there may configure the binaries.
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
rm -f "$LOG_DIR"/server-*.log "$LOG_DIR"/client-*.log "$TRY_FILE"
start_etcd # starts the servers first, see listen_servers
start_servers
if ((INTERACTIVE)); then
	stage_live_view
else
	stage_round_robin
	stage_failover
	summary
fi
