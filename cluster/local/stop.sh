#!/usr/bin/env bash
# Stop the local cluster started by start.sh: only the processes it recorded.
# Each node is a `ray start --block` process leading its own process group.
# SIGTERM lets it drain and end its raylet, GCS, dashboard and workers; after
# a grace period whatever is left of that process group gets SIGKILL.
# Worker nodes go first, the head last. The token and logs are kept
# (pass --purge to delete the whole state directory).
set -uo pipefail

STATE_DIR="${SERVE_APP_CLUSTER_DIR:-/tmp/serve_app_cluster}"
PID_DIR="$STATE_DIR/pids"
GRACE_S="${SERVE_APP_STOP_GRACE_S:-15}"

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop_node() {  # pid file
  local f="$1" name pid
  name=$(basename "$f" .pid)
  pid=$(cat "$f")
  if [[ ! "$pid" =~ ^[0-9]+$ ]]; then rm -f "$f"; return; fi
  if group_alive "$pid"; then
    local t0=$SECONDS how="SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( SECONDS + GRACE_S ))
    while group_alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
    # Anything of this node's process group still running after the grace period.
    if group_alive "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null && how="SIGKILL after ${GRACE_S}s"
    fi
    echo "stop.sh: stopped node $name (pid $pid, $how, $(( SECONDS - t0 ))s)"
  fi
  rm -f "$f"
}

if [[ -d "$PID_DIR" ]]; then
  for f in "$PID_DIR"/*.pid; do
    [[ -e "$f" ]] || continue
    [[ "$(basename "$f")" == head.pid ]] && continue
    stop_node "$f" &
  done
  wait
  [[ -e "$PID_DIR/head.pid" ]] && stop_node "$PID_DIR/head.pid"
else
  echo "stop.sh: no cluster recorded in $PID_DIR"
fi

if [[ "${1:-}" == "--purge" ]]; then
  rm -rf "$STATE_DIR"
  echo "stop.sh: removed $STATE_DIR"
fi
