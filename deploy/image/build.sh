#!/usr/bin/env bash
# make image: build the Dockerfile unchanged, as `docker build -t IMAGE .` would, with podman (no daemon) or docker.
#   deploy/image/build.sh work-sidecar:0.1.0
# When the Dockerfile's base (ARG PYTHON_IMAGE) is neither present nor pullable (no registry here), a stand-in is
# made from this machine's own Debian sources (local-base.sh) and tagged with that name. pip inside the build
# uses this machine's pip settings (CA bundle, index): mounted for the build only, never part of the image.
set -euo pipefail
cd "$(dirname "$0")/../.."
image="${1:?usage: build.sh IMAGE}"
. deploy/image/container-tool.sh
base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
started=$(date +%s)
if ! $CONTAINER_TOOL image exists "$base" 2>/dev/null && ! $CONTAINER_TOOL image inspect "$base" >/dev/null 2>&1; then
  if ! $CONTAINER_TOOL pull "$base" >/dev/null 2>&1; then
    echo "==> $base cannot be pulled: making a stand-in from this machine's Debian sources (deploy/image/local-base.sh)"
    deploy/image/local-base.sh "$base"
  fi
fi

# pip's settings for the build, from this machine's: the CA bundle (a TLS-intercepting proxy's CA, say) and an
# http(s) index. A file:// index or --find-links on this disk is not visible inside the build: left out.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mounts=()
pip_conf="$work/pip.conf"
echo "[global]" > "$pip_conf"
host_pip="python3 -m pip"
cert=${PIP_CERT:-$($host_pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  mounts+=(--volume "$(readlink -f "$cert"):/run/build-ca.pem:ro")
  echo "cert = /run/build-ca.pem" >> "$pip_conf"
fi
index=${PIP_INDEX_URL:-$($host_pip config get global.index-url 2>/dev/null || true)}
case "$index" in http://*|https://*) echo "index-url = $index" >> "$pip_conf" ;; esac
mounts+=(--volume "$pip_conf:/etc/pip.conf:ro")

format=()
case "$CONTAINER_TOOL" in podman*) format=(--format docker) ;; esac  # keeps HEALTHCHECK (OCI images have none)
echo "==> building $image with $CONTAINER_TOOL"
# shellcheck disable=SC2086
$CONTAINER_TOOL build $CONTAINER_ULIMITS "${format[@]}" "${mounts[@]}" --tag "$image" .
echo "==> built $image in $(( $(date +%s) - started )) s"
