#!/usr/bin/env bash
# Start a Ray cluster by hand across GPU nodes (use slurm_openrlhf.sbatch on Slurm clusters).
#
#   on the head node:     examples/scripts/openrlhf/ray_multinode.sh head
#   on every other node:  HEAD_IP=10.0.0.1 examples/scripts/openrlhf/ray_multinode.sh worker
#   then, on the head:    RAY_ADDRESS=auto RETRIEVAL_URL=http://10.0.0.1:8000 \
#                             examples/scripts/openrlhf/qwen2.5_14b_2nodes.sh dspo
#   to stop (each node):  examples/scripts/openrlhf/ray_multinode.sh stop
#
# Every node needs the same image/environment (docker/Dockerfile.train) and the model at the same path (or a hub
# id with a shared HF cache); the retrieval server must listen on an address the workers reach (HOST=0.0.0.0).
set -euo pipefail

ROLE="${1:?usage: $0 head|worker|stop}"
RAY_PORT="${RAY_PORT:-6379}"
GPUS="${GPUS:-8}"
NODE_IP="${NODE_IP:-$(hostname -I | awk '{print $1}')}"

case "${ROLE}" in
    head)
        ray start --head --node-ip-address "${NODE_IP}" --port "${RAY_PORT}" --num-gpus "${GPUS}" \
            --dashboard-host 0.0.0.0
        echo "Ray head at ${NODE_IP}:${RAY_PORT}; start workers with HEAD_IP=${NODE_IP} $0 worker"
        ;;
    worker)
        HEAD_IP="${HEAD_IP:?set HEAD_IP to the head node address}"
        ray start --address "${HEAD_IP}:${RAY_PORT}" --node-ip-address "${NODE_IP}" --num-gpus "${GPUS}"
        ;;
    stop)
        ray stop
        ;;
    *)
        echo "usage: $0 head|worker|stop" >&2
        exit 2
        ;;
esac
