#!/usr/bin/env bash
# A stand-in for the Dockerfile's base (python:3.11-slim-bookworm) where no registry can be reached: Debian bookworm
# (minbase) from this machine's own apt sources, with Debian's Python 3.11 as `python`, tagged with the base's name
# so that the Dockerfile builds unchanged. Needs root and mmdebstrap (apt-get install -y mmdebstrap).
#   deploy/image/local-base.sh python:3.11-slim-bookworm
set -euo pipefail
name="${1:?usage: local-base.sh IMAGE-NAME}"
. "$(dirname "$0")/container-tool.sh"
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  --format=tar bookworm "$work/base.tar" "$sources"
# shellcheck disable=SC2086
$CONTAINER_TOOL import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
  "$work/base.tar" "$name" >/dev/null
echo "==> $name: Debian bookworm with $($CONTAINER_TOOL run --rm $CONTAINER_ULIMITS "$name" python --version)"
