#!/usr/bin/env bash
# Entry point of `ray job submit` on the cluster of deploy/cluster.yaml (runs on the head):
# points the run at the head's Redis (password from the head's setup) and the Ray cluster,
# and keeps the run directory on the head's disk.
#   usage: bash deploy/cluster_run.sh CONFIG [d3s run options...]
set -euo pipefail
config="${1:?usage: cluster_run.sh CONFIG [--set key=value ...]}"
shift
head_ip="$(hostname -I | awk '{print $1}')"
export D3S_REDIS_URL="redis://:$(cat ~/.d3s_redis_password)@${head_ip}:6380/0"
exec d3s run "$config" --set service.ray_address=auto "$@"  # D3S_REDIS_URL: not on the command line, where ps shows it
