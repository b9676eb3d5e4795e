#!/usr/bin/env bash
# Builds the Go interop peers, greeter_server and greeter_client, into OUT_DIR/bin.
#
#   interop/go/build.sh OUT_DIR
#
# Uses only Debian's packages, in GOPATH mode (there is no Go module proxy here): golang-go,
# golang-google-grpc-dev, golang-etcd-server-dev and golang-goprotobuf-dev, whose protoc-gen-go
# still has `plugins=grpc`. The Go stubs are generated from our own proto/helloworld.proto into
# OUT_DIR at build time; generated code is never committed. Go's build cache makes a rebuild take
# about a second.
set -euo pipefail

out=${1:?usage: interop/go/build.sh OUT_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
install_hint="apt-get install -y golang-go golang-google-grpc-dev golang-etcd-server-dev golang-goprotobuf-dev protobuf-compiler"

for tool in go protoc protoc-gen-go; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "interop/go/build.sh: no $tool on PATH; install the Go peers' packages with: $install_hint" >&2
		exit 1
	}
done
for dir in google.golang.org/grpc go.etcd.io/etcd/clientv3/naming/resolver github.com/golang/protobuf/proto; do
	[[ -d /usr/share/gocode/src/$dir ]] || {
		echo "interop/go/build.sh: no /usr/share/gocode/src/$dir; install: $install_hint" >&2
		exit 1
	}
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
gopath=$out/gopath
rm -rf "$gopath/src"
mkdir -p "$gopath/src/helloworld" "$out/bin"
protoc -I"$root/proto" --go_out=plugins=grpc:"$gopath/src/helloworld" helloworld.proto
for peer in greeter_server greeter_client; do
	mkdir -p "$gopath/src/interop/$peer"
	cp "$here/$peer/main.go" "$gopath/src/interop/$peer/"
done

export GO111MODULE=off GOPROXY=off GOPATH="$gopath:/usr/share/gocode"
export GOCACHE=${GOCACHE:-$out/cache}
for peer in greeter_server greeter_client; do
	go build -o "$out/bin/$peer" "interop/$peer"
done
echo "built $out/bin/greeter_server and $out/bin/greeter_client ($(go version | cut -d' ' -f3))"
