#!/bin/sh
# The sandbox container's entrypoint under a ScaledObject: `work-sidecar exec --once HANDLER…` again and
# again, so that SIGTERM (a scale-in deleting this pod) never interrupts an item:
#   - between items, or waiting for one: SIGTERM stops `exec` at once (it holds nothing) and the loop exits 0;
#   - while the handler runs an item: the loop starts no further `exec`, lets this one finish its item
#     (the handler's exit stops the item through the sidecar, as always) and exits 0 after it.
# The pod's terminationGracePeriodSeconds must outlast the longest item plus the sidecar's drain; what is
# still running then is SIGKILLed and its lease expires after its TTL (the item is requeued, never lost).
set -u
state="${SANDBOX_STATE_DIR:-/tmp/sandbox-loop}"
mkdir -p "$state"
busy="$state/busy"
rm -f "$busy"
stopping=0
pid=""

on_term() {
  stopping=1
  if [ -n "$pid" ] && [ ! -e "$busy" ]; then
    kill -TERM "$pid" 2>/dev/null  # no item in hand: nothing to interrupt
  fi
}
trap on_term TERM INT

while [ "$stopping" = 0 ]; do
  # The handler runs inside a wrapper that marks the item in hand.
  work-sidecar exec --once -- /bin/sh -c ': > "$0"; "$@"; code=$?; rm -f "$0"; exit "$code"' "$busy" "$@" &
  pid=$!
  [ "$stopping" = 0 ] || on_term  # SIGTERM came before $pid was known
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"  # returns early when SIGTERM arrives; keep waiting for the item in hand
  done
  pid=""
done
exit 0
