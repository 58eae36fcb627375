#!/usr/bin/env bash
# A sandbox in plain shell: the whole work-item flow with grpcurl, no .proto at hand (server reflection).
#
#   make run                                   # in another terminal: sidecar + embedded emulator
#   examples/grpcurl/walkthrough.sh            # or with SIDECAR / EMULATOR / ENVIRONMENT set
#
# SIDECAR      the sidecar's TCP address             (default 127.0.0.1:50051)
# EMULATOR     the Work API emulator's URL, to queue an item through its admin API (default http://127.0.0.1:8787)
# ENVIRONMENT  the environment the sidecar serves    (default env_local)
# AUTH_TOKEN   the sidecar's bearer token, if it was started with --auth-token
# GRPCURL      the grpcurl binary                    (default: grpcurl on PATH, else the repo's .venv/bin/grpcurl,
#                                                    which make run installs)
set -euo pipefail

SIDECAR=${SIDECAR:-127.0.0.1:50051}
EMULATOR=${EMULATOR:-http://127.0.0.1:8787}
ENVIRONMENT=${ENVIRONMENT:-env_local}
if [[ -z "${GRPCURL:-}" ]]; then
    GRPCURL=$(command -v grpcurl || echo "$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/grpcurl")
fi
[[ -x "$GRPCURL" ]] || command -v "$GRPCURL" >/dev/null || {
    echo "grpcurl not found: run make run (it installs .venv/bin/grpcurl) or set GRPCURL" >&2
    exit 1
}
SERVICE=sidecar.work.v1.WorkService

common=(-plaintext)
[[ -n "${AUTH_TOKEN:-}" ]] && common+=(-H "authorization: Bearer $AUTH_TOKEN")
grpc() { "$GRPCURL" "${common[@]}" -max-time 10 "$@"; }  # unary calls: never hang
step() { printf '\n==> %s\n' "$*"; }

step "1. list the services (server reflection)"
grpc "$SIDECAR" list

step "2. describe the work service"
grpc "$SIDECAR" describe "$SERVICE"

step "3. health: the server as a whole, then the work service"
grpc "$SIDECAR" grpc.health.v1.Health/Check
grpc -d "{\"service\":\"$SERVICE\"}" "$SIDECAR" grpc.health.v1.Health/Check

step "4. queue statistics"
grpc -emit-defaults "$SIDECAR" "$SERVICE/GetQueueStats"

step "5. watch for work (in the background) and queue one item through the emulator's admin API"
umask 077  # the watch output holds the item's lease token and secret: keep it private, delete it at the end
events=$(mktemp)
trap 'kill "$watch" 2>/dev/null || true; rm -f "$events"' EXIT
"$GRPCURL" "${common[@]}" -d '{"max_in_flight":1,"sandbox_id":"grpcurl-walkthrough"}' "$SIDECAR" "$SERVICE/WatchWork" \
    >"$events" 2>&1 &
watch=$!
curl -fsS -X POST "$EMULATOR/_emulator/environments/$ENVIRONMENT/work" -H 'content-type: application/json' \
    -d '{"count":1}' >/dev/null
for _ in $(seq 100); do  # up to 10 s for the assignment
    grep -q '"lease_token"' "$events" && break
    sleep 0.1
done
work_id=$(sed -n 's/^ *"id": "\(work_[^"]*\)".*/\1/p' "$events" | head -n1)
lease_token=$(sed -n 's/^ *"lease_token": "\([^"]*\)".*/\1/p' "$events" | head -n1)
if [[ -z "$work_id" || -z "$lease_token" ]]; then
    echo "no work was assigned within 10 s" >&2
    exit 1
fi
echo "assigned $work_id (lease token and secret not shown)"

step "6. read the item back (every call on an item needs its lease token)"
grpc -d "{\"work_id\":\"$work_id\",\"lease_token\":\"$lease_token\"}" "$SIDECAR" "$SERVICE/GetWork"

step "7. the work is done: stop it"
grpc -d "{\"work_id\":\"$work_id\",\"lease_token\":\"$lease_token\",\"force\":true}" "$SIDECAR" "$SERVICE/StopWork"

step "8. queue statistics again"
grpc -emit-defaults "$SIDECAR" "$SERVICE/GetQueueStats"
echo
echo "done: $work_id stopped"
