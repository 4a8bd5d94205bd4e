#!/usr/bin/env bash
# Multi-node training with torchrun. Run the same command on every node, changing NODE_RANK:
#
#   # node 0 (its address: node0.cluster)          # node 1
#   NODE_RANK=0 MASTER_ADDR=node0.cluster \         NODE_RANK=1 MASTER_ADDR=node0.cluster \
#     scripts/torchrun_two_nodes.sh model=llama-1b    scripts/torchrun_two_nodes.sh model=llama-1b
#
# Every rank composes the config itself, so all ranks are given the same run folder (RUN_DIR,
# default outputs/torchrun/$RUN_ID); the folder must be on storage all nodes share. Extra
# arguments are train.py overrides (algo=..., data=..., strategy.sharding=hybrid, ...).
#
# On one machine, as a loopback check (CPU, gloo):
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=2 TRAINER=cpu \
#     scripts/torchrun_two_nodes.sh experiment=smoke
set -euo pipefail

NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK to this node\'s index, 0 .. NNODES-1}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  (( GPUS_PER_NODE > 0 )) || { echo "no GPU found: set GPUS_PER_NODE" >&2; exit 2; }
fi
TRAINER=${TRAINER:-multinode}   # conf/trainer/<TRAINER>.yaml: multinode (GPUs, bf16) or cpu
RUN_ID=${RUN_ID:-lmforge-$(date +%Y%m%d)}
RUN_DIR=${RUN_DIR:-outputs/torchrun/$RUN_ID}

cd "$(dirname "$0")/.."
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  train.py \
  trainer="$TRAINER" trainer.num_nodes="$NNODES" trainer.devices="$GPUS_PER_NODE" \
  strategy=fsdp \
  hydra.run.dir="$RUN_DIR" \
  "$@"
