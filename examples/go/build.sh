#!/usr/bin/env bash
# Builds the Go example sandbox offline with Debian's Go packages (make polyglot-deps installs them):
# generates the stubs from proto/ with protoc-gen-go + protoc-gen-go-grpc into a GOPATH of its own (they are
# never committed, so they cannot go stale), then runs go vet and go test and builds the binary.
#
#   examples/go/build.sh [OUT_DIR]     -> OUT_DIR/sandbox (OUT_DIR default: a new temporary directory)
#
# GOPATH mode (GO111MODULE=off): Debian ships google.golang.org/grpc and google.golang.org/protobuf as sources
# under /usr/share/gocode, so nothing is downloaded.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$(mktemp -d "${TMPDIR:-/tmp}/work-sidecar-go.XXXXXX")}
mkdir -p "$out/gopath/src"
out=$(cd "$out" && pwd)

echo "==> protoc --go_out --go-grpc_out (into $out/gopath/src)" >&2
protoc -I "$root/proto" --go_out="$out/gopath/src" --go-grpc_out="$out/gopath/src" sidecar/work/v1/work_service.proto

export GO111MODULE=off GOFLAGS= GOPATH="$out/gopath:${WORK_SIDECAR_GOCODE:-/usr/share/gocode}"
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
  export GOCACHE="$out/gocache" # go needs a build cache; without HOME it has no default
fi
cd "$here"
echo "==> go vet, go test, go build ($(go version))" >&2
go vet .
go test .
go build -o "$out/sandbox" .
echo "$out/sandbox"
