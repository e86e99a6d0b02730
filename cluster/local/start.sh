#!/usr/bin/env bash
# Start a local multi-node Ray cluster on one machine, bound to 127.0.0.1:
#   head            CPU node: GCS, dashboard, Serve controller and HTTP proxy
#   retriever-N     CPU worker nodes with custom resource {"retriever_node": 1}
#   reranker-N      worker nodes with custom resource {"reranker_node": 1}
# Every node is a `ray start --block` process in its own session (process
# group); its PID is recorded under $SERVE_APP_CLUSTER_DIR/pids so that
# stop.sh ends exactly these processes (never `ray stop`, which would end
# every Ray process on the machine).
#
# Token authentication is on (RAY_AUTH_MODE=token). The token is generated
# here (256 random bits) into $SERVE_APP_CLUSTER_DIR/auth_token (mode 600),
# unless RAY_AUTH_TOKEN_PATH already names a token file. Clients (ray CLI,
# serve CLI, ray.init, the state API) need the same two variables:
#     source "$SERVE_APP_CLUSTER_DIR/env.sh"
#
# Settings (environment variables, all optional):
#   SERVE_APP_CLUSTER_DIR      state dir: token, env.sh, pids, node logs, Ray temp dir
#                              (default /tmp/serve_app_cluster; keep it short:
#                              Ray's Unix socket paths must stay under 108 bytes)
#   SERVE_APP_GCS_PORT         head GCS port                       (default 6390)
#   SERVE_APP_DASHBOARD_PORT   dashboard / job / serve REST port   (default 8275)
#   SERVE_APP_CLIENT_PORT      Ray client server port              (default 6391)
#   SERVE_APP_PORT_BASE        first of the per-node ports: node i (head = 0)
#                              gets metrics export port BASE+10*i and dashboard
#                              agent port BASE+10*i+1; the head's dashboard and
#                              autoscaler metrics get BASE+2, BASE+3 (default 20300)
#   (Ray's worker processes take ports 10002-19999: keep every port above out
#   of that range.)
#   SERVE_APP_RETRIEVER_NODES  number of retriever nodes           (default 1)
#   SERVE_APP_RERANKER_NODES   number of reranker nodes            (default 1)
#   SERVE_APP_NODE_CPUS        logical CPUs per worker node        (default 2)
#   SERVE_APP_HEAD_CPUS        logical CPUs on the head            (default 2)
#   SERVE_APP_RERANKER_GPUS    GPUs per reranker node              (default 0)
#   SERVE_APP_OBJECT_STORE_MB  object store per node, MiB          (default 256)
set -euo pipefail

STATE_DIR="${SERVE_APP_CLUSTER_DIR:-/tmp/serve_app_cluster}"
GCS_PORT="${SERVE_APP_GCS_PORT:-6390}"
DASHBOARD_PORT="${SERVE_APP_DASHBOARD_PORT:-8275}"
CLIENT_PORT="${SERVE_APP_CLIENT_PORT:-6391}"
PORT_BASE="${SERVE_APP_PORT_BASE:-20300}"
N_RETRIEVER="${SERVE_APP_RETRIEVER_NODES:-1}"
N_RERANKER="${SERVE_APP_RERANKER_NODES:-1}"
NODE_CPUS="${SERVE_APP_NODE_CPUS:-2}"
HEAD_CPUS="${SERVE_APP_HEAD_CPUS:-2}"
RERANKER_GPUS="${SERVE_APP_RERANKER_GPUS:-0}"
OBJECT_STORE_BYTES=$(( ${SERVE_APP_OBJECT_STORE_MB:-256} * 1024 * 1024 ))
HOST=127.0.0.1

RAY_BIN="${RAY_BIN:-$(command -v ray || true)}"
if [[ -z "$RAY_BIN" ]]; then
  echo "start.sh: error: the 'ray' command is not on PATH (activate the virtualenv: . .venv/bin/activate)" >&2
  exit 2
fi

PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/logs"
TEMP_DIR="$STATE_DIR/ray"
if compgen -G "$PID_DIR/*.pid" > /dev/null; then
  echo "start.sh: error: a cluster is already recorded in $PID_DIR; run cluster/local/stop.sh first" >&2
  exit 2
fi
mkdir -p "$PID_DIR" "$LOG_DIR" "$TEMP_DIR"
chmod 700 "$STATE_DIR"

# --- token -----------------------------------------------------------------
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  TOKEN_PATH="$RAY_AUTH_TOKEN_PATH"
  [[ -s "$TOKEN_PATH" ]] || { echo "start.sh: error: RAY_AUTH_TOKEN_PATH=$TOKEN_PATH is empty or missing" >&2; exit 2; }
else
  TOKEN_PATH="$STATE_DIR/auth_token"
  if [[ ! -s "$TOKEN_PATH" ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_PATH")
  fi
fi
chmod 600 "$TOKEN_PATH" 2>/dev/null || true

cat > "$STATE_DIR/env.sh" <<ENV
# Source this file to talk to the local serve_app cluster.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH='$TOKEN_PATH'
unset RAY_AUTH_TOKEN
export RAY_ADDRESS='$HOST:$GCS_PORT'
export RAY_DASHBOARD_ADDRESS='http://$HOST:$DASHBOARD_PORT'
ENV

export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$TOKEN_PATH"
unset RAY_AUTH_TOKEN RAY_ADDRESS
# Short drain on SIGTERM: stop.sh is for local use; production keeps Ray's default.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-2}"
export RAY_USAGE_STATS_ENABLED=0

launch_node() {  # name, index (for its ports), then extra `ray start` arguments
  local name="$1" index="$2"; shift 2
  local metrics_port=$(( PORT_BASE + 10 * index ))
  local agent_port=$(( PORT_BASE + 10 * index + 1 ))
  # setsid: own session and process group, so that stop.sh can end the node and everything
  # it spawned by this one id. --block: the node lives as long as this process.
  PYTHONUNBUFFERED=1 setsid "$RAY_BIN" start --block --disable-usage-stats \
      --node-ip-address "$HOST" --temp-dir "$TEMP_DIR" \
      --object-store-memory "$OBJECT_STORE_BYTES" \
      --metrics-export-port "$metrics_port" \
      --dashboard-agent-listen-port "$agent_port" \
      "$@" >> "$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$PID_DIR/$name.pid"
  echo "start.sh: node $name (pid $!, metrics port $metrics_port), log $LOG_DIR/$name.log"
}

wait_started() {  # name: until `ray start` reports the node registered; 1 if it exited
  local name="$1" pid deadline=$(( SECONDS + TIMEOUT_S ))
  pid=$(cat "$PID_DIR/$name.pid")
  until grep -q "Ray runtime started" "$LOG_DIR/$name.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || (( SECONDS >= deadline )); then return 1; fi
    sleep 0.5
  done
}

# Nodes start one after the other: `ray start` gives a node 30 s to register with the GCS,
# which a loaded machine (2 cores shared with other work) can miss when all start at once.
# A node that misses it is started once more.
start_node() {  # name, index, then extra `ray start` arguments
  local name="$1" attempt
  for attempt in 1 2; do
    launch_node "$@"
    if wait_started "$name"; then return 0; fi
    local pid; pid=$(cat "$PID_DIR/$name.pid")
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "start.sh: node $name did not start (attempt $attempt); end of its log:" >&2
    tail -n 3 "$LOG_DIR/$name.log" >&2 || true
  done
  return 1
}

fail() {
  echo "start.sh: error: $1" >&2
  "$(dirname "$0")/stop.sh" >&2 || true
  exit 1
}

TIMEOUT_S="${SERVE_APP_START_TIMEOUT_S:-120}"

# Ray's fixed defaults (44227, 44217) would collide with any other Ray instance on the machine.
export DASHBOARD_METRIC_PORT=$(( PORT_BASE + 2 )) AUTOSCALER_METRIC_PORT=$(( PORT_BASE + 3 ))
start_node head 0 --head --port "$GCS_PORT" \
    --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 --resources '{"head_node": 1}' \
  || fail "the head node did not start"

index=1
for i in $(seq 1 "$N_RETRIEVER"); do
  start_node "retriever-$i" "$index" --address "$HOST:$GCS_PORT" \
      --num-cpus "$NODE_CPUS" --num-gpus 0 --resources '{"retriever_node": 1}' \
    || fail "node retriever-$i did not start"
  index=$(( index + 1 ))
done
for i in $(seq 1 "$N_RERANKER"); do
  start_node "reranker-$i" "$index" --address "$HOST:$GCS_PORT" \
      --num-cpus "$NODE_CPUS" --num-gpus "$RERANKER_GPUS" --resources '{"reranker_node": 1}' \
    || fail "node reranker-$i did not start"
  index=$(( index + 1 ))
done

want=$(( 1 + N_RETRIEVER + N_RERANKER ))
# RAY_ADDRESS: the state API would otherwise look for "the" local cluster and refuse when
# other Ray instances run on the machine.
RAY_ADDRESS="$HOST:$GCS_PORT" "${PYTHON:-python3}" - "$HOST:$GCS_PORT" "$want" "$TIMEOUT_S" "$PID_DIR" <<'PY' || fail "the cluster did not come up"
"""Wait until the expected number of nodes is alive; fail early if a node process exits."""
import os, sys, time
address, want, timeout, pid_dir = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
import ray
from ray.util.state import list_nodes

def dead_nodes():
    out = []
    for name in os.listdir(pid_dir):
        pid = int(open(os.path.join(pid_dir, name)).read())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out.append(name[:-4])
    return out

ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
alive = 0
while time.monotonic() < deadline:
    if dead := dead_nodes():
        sys.exit(f"node process exited: {', '.join(dead)}")
    alive = sum(1 for n in list_nodes() if n.state == "ALIVE")
    if alive >= want:
        print(f"start.sh: {alive} nodes alive")
        sys.exit(0)
    time.sleep(1)
sys.exit(f"{alive} of {want} nodes alive after {timeout:.0f}s")
PY

echo "start.sh: cluster up. Dashboard http://$HOST:$DASHBOARD_PORT (token required)."
echo "start.sh: clients: source $STATE_DIR/env.sh"
