#!/usr/bin/env bash
# Installs the toolchains of the polyglot examples and of `make buf-lint` (run by `make polyglot-deps`, and by
# .ci/run on a fresh Debian machine before `make test`). Idempotent: what is already there is not installed again.
#
#   Go:   golang-go + Debian's Go gRPC/protobuf sources (the Go example builds offline in GOPATH mode with them);
#         github.com/golang/protobuf must be the 1.5 line (APIv2-based): grpc-go's codec with the 1.3 line, which
#         golang-google-grpc-dev would pull in otherwise, panics on protoc-gen-go 1.28 messages
#   protoc with protoc-gen-go and protoc-gen-go-grpc (the Go stubs are generated at build time, never committed)
#   Node: `npm ci` at the repo root (@bufbuild/buf, pinned) and in examples/node (@grpc/grpc-js, @grpc/proto-loader)
#
# The Go part apt-installs Debian packages: it needs root (or sudo). Without either it is skipped with the reason
# (the Go tests then skip too) and only the npm part runs: Node example and buf need no root. With
# WORK_SIDECAR_REQUIRE_POLYGLOT set (CI) a skipped part is an error instead.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi

APT_PACKAGES=(
  golang-go
  golang-google-grpc-dev
  golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev
  protoc-gen-go
  protoc-gen-go-grpc
  protobuf-compiler
)
# Node.js is normally on the machine already; Debian's nodejs + npm only when it is not.
if ! command -v node >/dev/null 2>&1; then
  APT_PACKAGES+=(nodejs)
fi
if ! command -v npm >/dev/null 2>&1; then
  APT_PACKAGES+=(npm)
fi

missing=()
for package in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  if [ "$status" = "install ok installed" ]; then
    say "apt: $package is installed"
  else
    missing+=("$package")
  fi
done

tools=(go protoc protoc-gen-go protoc-gen-go-grpc node npm)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "skipping apt-get install ${missing[*]}: it needs root and sudo is not installed" >&2
  echo "  (the Go example and its tests are skipped; run this as root to add them)" >&2
  if [ -n "${WORK_SIDECAR_REQUIRE_POLYGLOT:-}" ]; then
    echo "error: WORK_SIDECAR_REQUIRE_POLYGLOT is set, so every toolchain is required" >&2
    exit 1
  fi
  tools=(node npm)
  missing=()
fi

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  say "apt-get update (missing: ${missing[*]}; needs root: ${SUDO[*]:-running as root})"
  "${SUDO[@]}" apt-get update -q
  say "apt-get install ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is still missing after the install" >&2; exit 1; }
done
if command -v go >/dev/null 2>&1; then
  say "go: $(go version)"
  say "protoc: $(protoc --version)"
fi
say "node: $(node --version), npm: $(npm --version)"

for dir in . examples/node; do
  say "npm ci in $dir"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
done
say "buf: $(node_modules/.bin/buf --version)"
say "polyglot toolchains ready"
