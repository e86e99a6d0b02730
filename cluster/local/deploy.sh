#!/usr/bin/env bash
# Deploy serve_app onto the local multi-node cluster (run cluster/local/start.sh first).
#
#   cluster/local/deploy.sh [--overlay FILE]... [--timeout SECONDS]
#
# Renders cluster/local/deployments.local.yaml (deployments.yaml + overlays/local.yaml, plus
# any --overlay, e.g. another index_dir or local model paths; format in
# cluster/render_rayservice.py) into $SERVE_APP_CLUSTER_DIR/deployments.yaml, submits it with
# `serve deploy` through the head's dashboard (token from env.sh), and waits until the
# application is RUNNING. Every node of the local cluster runs on this machine, so they all
# read the same index directory (args.index_dir; built once by the app builder under a file
# lock when absent).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE_DIR="${SERVE_APP_CLUSTER_DIR:-/tmp/serve_app_cluster}"
TIMEOUT_S=600
overlays=()
while (( $# )); do
  case "$1" in
    --overlay) overlays+=(--overlay "$2"); shift 2 ;;
    --timeout) TIMEOUT_S="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "deploy.sh: error: unknown argument $1" >&2; exit 2 ;;
  esac
done

[[ -f "$STATE_DIR/env.sh" ]] || { echo "deploy.sh: error: no cluster state in $STATE_DIR; run cluster/local/start.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
source "$STATE_DIR/env.sh"
PYTHON="${PYTHON:-python3}"

CONFIG="$STATE_DIR/deployments.yaml"
"$PYTHON" "$REPO/cluster/render_rayservice.py" local "${overlays[@]}" --out "$CONFIG" > /dev/null
serve deploy "$CONFIG" --address "$RAY_DASHBOARD_ADDRESS"

"$PYTHON" - "$CONFIG" "$TIMEOUT_S" <<'PY'
"""Wait until every application of the config is RUNNING; fail fast on DEPLOY_FAILED."""
import sys
import time

import yaml
from ray.serve.schema import ServeDeploySchema

config = ServeDeploySchema.model_validate(yaml.safe_load(open(sys.argv[1])))
names = [app.name for app in config.applications]
deadline = time.monotonic() + float(sys.argv[2])

import ray
from ray import serve

ray.init(logging_level="ERROR", log_to_driver=False)
last = {}
while time.monotonic() < deadline:
    status = serve.status()
    last = {n: status.applications[n].status if n in status.applications else "NOT_STARTED" for n in names}
    failed = {n: status.applications[n].message for n, s in last.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
    if failed:
        sys.exit(f"deploy.sh: error: application(s) failed: {failed}")
    if all(s == "RUNNING" for s in last.values()):
        print(f"deploy.sh: {', '.join(names)} RUNNING; HTTP on http://{config.http_options.host}:{config.http_options.port}")
        sys.exit(0)
    time.sleep(2)
sys.exit(f"deploy.sh: error: not RUNNING after {sys.argv[2]}s: {last}")
PY
