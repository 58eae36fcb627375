#!/usr/bin/env bash
# Sourced by build.sh and the image test: picks the container tool and the flags this host needs.
#   CONTAINER_TOOL  podman (daemonless, preferred) or docker; override to force one
#   CONTAINER_ULIMITS  --ulimit flags: a runtime refuses limits above the host's hard rlimits, and podman asks for
#                      more than some hosts allow; these stay under the usual hard limits
if [ -z "${CONTAINER_TOOL:-}" ]; then
  if command -v podman >/dev/null 2>&1; then
    CONTAINER_TOOL=podman
    # crun cannot start containers on some kernels' cgroup layouts; runc can. Use runc whenever it is installed.
    if command -v runc >/dev/null 2>&1; then CONTAINER_TOOL="podman --runtime runc"; fi
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    CONTAINER_TOOL=docker
  else
    echo "no container tool: install podman and runc (apt-get install -y podman runc) or run a Docker engine" >&2
    exit 3
  fi
fi
hard_nofile=$(ulimit -Hn)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
nofile=$(( hard_nofile < 16384 ? hard_nofile : 16384 ))
CONTAINER_ULIMITS="${CONTAINER_ULIMITS:---ulimit nofile=${nofile}:${nofile} --ulimit nproc=4096:4096}"
export CONTAINER_TOOL CONTAINER_ULIMITS
