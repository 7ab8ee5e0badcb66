#!/usr/bin/env bash
# What the test suite starts for real besides Python packages, from Debian's packages:
# PostgreSQL (the cluster storage tests run MLflow on it) and Slurm + munge (a one-node
# Slurm cluster runs a training stage through sbatch). Installed here when missing (root
# + apt-get), else the error says how. SeaweedFS, hadolint and kubernetes-validate come
# from PyPI (the dev extra); kubectl renders the cluster manifests.
set -euo pipefail
missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null && ! command -v initdb > /dev/null; then
  missing+=(postgresql)
fi
for pair in slurmctld:slurm-wlm munged:munge; do
  [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  echo "installing ${missing[*]} (apt-get) for the storage and Slurm tests" >&2
  apt-get update -q > /dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null
else
  echo "error: the storage and Slurm tests need: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
