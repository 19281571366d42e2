#!/usr/bin/env bash
# ./distributed_train.sh NUM_PROC DATA [train.py flags]  ==  torchrun --nproc_per_node=NUM_PROC train.py DATA ...
# Multi-node: set torchrun's own options through TORCHRUN_ARGS, e.g.
#   TORCHRUN_ARGS="--nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500" ./distributed_train.sh 8 ...
# gloo is used on CPU and nccl on CUDA (train.py picks the backend from --device).
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROC DATA [train.py flags]  (NUM_PROC: processes per node, an integer >= 1; got '${1:-}')" >&2
  exit 2
fi
NUM_PROC=$1
shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
if [ -x "$HERE/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then PYTHON="$HERE/.venv/bin/python"; fi
# torchrun through snnet.train.launch: every input is checked once there, before torchrun starts NUM_PROC
# processes (a bad one is one line and exit 2, not one error per rank followed by torchrun's traceback;
# SNNET_NO_PREFLIGHT=1 skips it: train.py checks again anyway), and an input refused inside a rank is its one line
# and exit 2 too
# shellcheck disable=SC2086
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m snnet.train.launch --nproc_per_node="$NUM_PROC" ${TORCHRUN_ARGS:-} "$HERE/train.py" "$@"
