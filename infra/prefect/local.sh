#!/usr/bin/env bash
# A local Prefect server, the two work pools, both deployments of idlm-full and a process
# worker for `idlm-local`, from the repo root. Ctrl-C stops the worker and the server.
# Then, in another terminal:  prefect deployment run 'idlm-full/local'
set -euo pipefail
set -m  # server and worker get their own process groups and the default SIGINT handling
cd "$(dirname "$0")/../.."
if [ -d .venv ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
port="${PREFECT_PORT:-4200}"
export PREFECT_API_URL="http://127.0.0.1:${port}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false

prefect server start --host 127.0.0.1 --port "$port" &
server=$!
worker=""
# Stop a process: SIGINT (what Ctrl-C sends), then SIGTERM, then SIGKILL, 10 s apart.
stop_process() {
  local pid="$1" signal
  for signal in INT TERM KILL; do
    kill -s "$signal" "$pid" 2>/dev/null || return 0
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  done
}
stop() {
  if [ -n "$worker" ]; then stop_process "$worker"; fi
  stop_process "$server"
}
trap stop EXIT
trap 'exit 130' INT TERM
python - <<'EOF'
import os, time, urllib.request
url = os.environ["PREFECT_API_URL"] + "/health"
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except OSError:
        time.sleep(1)
else:
    raise SystemExit(f"no Prefect server at {url} after 2 minutes")
EOF

prefect work-pool create idlm-local --type process --overwrite
prefect work-pool create idlm-gpu --type process --overwrite
# `{{ $PWD }}` (local) and `{{ $IDLM_CLUSTER_WORKSPACE }}` (cluster) resolve now.
IDLM_CLUSTER_WORKSPACE="${IDLM_CLUSTER_WORKSPACE:-$PWD}" \
MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-}" \
  prefect --no-prompt deploy --all

prefect worker start --pool idlm-local &
worker=$!
echo "Prefect UI: http://127.0.0.1:${port}   run: prefect deployment run 'idlm-full/local'"
wait "$worker"
