#!/usr/bin/env bash
# Tensor parallelism on a 2-GPU machine (nvidia-h200-x2): the TP GPU test, then the standard
# throughput workload with qwen3-8b dummy at TP=1 and TP=2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 -m pytest -q -x tests/gpu/test_tensor_parallel_gpu.py 2>&1 | tail -4
for tp in 1 2; do
  timeout 300 python3 -m tachyon.entrypoints.cli bench throughput --model qwen3-8b \
      --tensor-parallel-size $tp --json "$OUT/throughput_8b_tp$tp.json" 2>&1 \
      | tr '\r' '\n' | grep -E "^tok/s|^seconds|fraction|Error|error"
done
