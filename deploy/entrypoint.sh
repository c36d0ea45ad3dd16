#!/usr/bin/env bash
# Container entry point: `d3s-entrypoint <component> [args...]` runs `d3s <component> [args...]`
# after two things compose cannot express per container:
#
# 1. Rollout replicas (`--scale rollout=N`) need distinct indices (seed stream and share of each
#    step) and distinct GPUs. Compose gives every replica the same command and environment, but
#    names the containers <project>-rollout-1..N (<project>_rollout_1..N with docker-compose v1)
#    and Docker's DNS answers a reverse lookup of a container's IP with that name. The replica
#    number n gives --index n-1 (stable across a container's restarts) and, among the GPUs the
#    service reserves, the one at position (n-1) mod count. D3S_ROLLOUT_INDEX overrides.
# 2. Components that hold Ray objects (learner, rollout) join the Ray head at $D3S_RAY_HEAD as
#    a node of their own, with a custom resource naming their role, so `ray.init("auto")`
#    finds a local node.
set -euo pipefail
component="${1:?usage: d3s-entrypoint <component> [args...]}"

replica_number() {
    local ip name
    ip="$(hostname -i | awk '{print $1}')"
    name="$(dig +short -x "$ip" @127.0.0.11 | head -n1)"
    name="${name%%.*}"
    if [[ ! "$name" =~ [-_]([0-9]+)$ ]]; then
        echo "d3s-entrypoint: cannot tell this replica's number from its DNS name '${name}' (ip ${ip}); set D3S_ROLLOUT_INDEX" >&2
        exit 2
    fi
    echo "${BASH_REMATCH[1]}"
}

if [[ "$component" == rollout ]]; then
    if [[ -n "${D3S_ROLLOUT_INDEX:-}" ]]; then
        index="$D3S_ROLLOUT_INDEX"
    else
        number="$(replica_number)"  # exits here (set -e) when the name tells nothing
        index=$(( number - 1 ))
    fi
    if command -v nvidia-smi >/dev/null && gpus="$(nvidia-smi -L | wc -l)" && (( gpus > 0 )); then
        export CUDA_VISIBLE_DEVICES=$(( index % gpus ))
    fi
    echo "d3s-entrypoint: rollout index ${index}, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}" >&2
    set -- "$@" --index "$index"
fi

if [[ -n "${D3S_RAY_HEAD:-}" && ( "$component" == learner || "$component" == rollout ) ]]; then
    ray start --address="$D3S_RAY_HEAD" --resources="{\"d3s_${component}\": 1}" --disable-usage-stats
    trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
    d3s "$@"
    exit $?
fi
exec d3s "$@"
