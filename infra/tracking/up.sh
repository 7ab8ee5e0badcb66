#!/usr/bin/env bash
# The tracking stack on this machine, from packages, on loopback: PostgreSQL (MLflow's
# backend store), SeaweedFS `weed mini` (S3: MLflow artifacts and the DVC remote) and
# `mlflow server`. Secrets come from the environment only:
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... PGPASSWORD=...
#   bash infra/tracking/up.sh            # prints the exports that point a client at it
#   bash infra/tracking/up.sh down       # stops it (data stays in .stack/)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
action=${1:-up}
python -m idlm.orchestration.stack "$action" --dir "${IDLM_STACK_DIR:-.stack}"
if [ "$action" = up ]; then
  cat >&2 <<'HINT'
# DVC remote (the URL is tracked, the endpoint is local, the keys stay in the environment):
#   dvc remote add -d storage s3://idlm/dvc
#   dvc remote modify --local storage endpointurl "$AWS_ENDPOINT_URL_S3"
HINT
fi
