#!/usr/bin/env bash
# Issue 17's GPU figures on a multi-GPU machine (nvidia-h200-x2, -x4 or -x8; what runs depends
# on the GPUs it finds). JSON under $OUT:
#   gpus.txt                        the GPUs, and the interconnect matrix
#   allreduce_tp{2,4,8}.json        NCCL all-reduce latency per size, 1 KiB .. 64 MiB, eager
#                                   and replayed from a CUDA graph (gpu_allreduce_bench.py)
#   throughput_8b_tp{1,2}.json      the standard workload, qwen3-8b dummy (target: TP=2 >= 1.7x)
#   throughput_32b_tp{4,8}.json     the same for the qwen3-32b preset
#   split_<model>_tp<N>[_sync].json a decode step at batch 1, 64 and 256 split into compute /
#                                   communication / control (gpu_tp_step_split.py)
# NVLink multicast stays off on these machines: NCCL_NVLS_ENABLE=0, and no symmetric-memory
# multicast (nothing here calls cuMulticastCreate).
# A whole run outlasts one 10-minute device command: pick stages, e.g.
#   STAGES=test,allreduce scripts/gpu_tp_bench.sh; STAGES=throughput ...; STAGES=split ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L | wc -l)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m; } \
    | tee "$OUT/gpus.txt"
fits() { [ "$1" -le "$NGPU" ]; }
want() { [[ ",${STAGES:-test,allreduce,throughput,split}," == *",$1,"* ]]; }

# Correctness before speed: TP=2 greedy equals TP=1 under FULL_AND_PIECEWISE.
want test && fits 2 && timeout 300 python3 -m pytest -q -x tests/gpu/test_tensor_parallel_gpu.py 2>&1 | tail -4

for tp in 2 4 8; do
  want allreduce && fits $tp || continue
  timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node $tp \
      scripts/gpu_allreduce_bench.py --json "$OUT/allreduce_tp$tp.json" 2>&1 | tail -20
done

bench() {  # model tag tp
  timeout 600 python3 -m tachyon.entrypoints.cli bench throughput --model "$1" \
      --load-format dummy --tensor-parallel-size "$3" --no-plot \
      --json "$OUT/throughput_$2_tp$3.json" 2>&1 \
      | tr '\r' '\n' | grep -E "^tok/s|^seconds|fraction|Error|error"
}
if want throughput; then
  for tp in 1 2; do fits $tp && bench qwen3-8b 8b $tp; done
  for tp in 4 8; do fits $tp && bench qwen3-32b 32b $tp; done
fi

split() {  # model tp tag [extra flags]: batches 1, 64 and 256 in one engine
  local model=$1 tp=$2 tag=$3; shift 3
  local ar=()
  [ "$tp" -gt 1 ] && ar=(--allreduce "$OUT/allreduce_tp$tp.json")
  timeout 420 python3 scripts/gpu_tp_step_split.py --model "$model" -tp "$tp" \
      --batch 1 64 256 "${ar[@]}" --json "$OUT/split_${model}_tp${tp}${tag}.json" "$@" 2>&1 \
      | grep -E '"(batch|step_us|driver_control_us|comm_us|compute_us)"|Error|error'
}
if want split; then
  for tp in 1 2; do fits $tp && split qwen3-8b $tp ""; done
  fits 2 && split qwen3-8b 2 _sync --no-async-scheduling
  for tp in 4 8; do fits $tp && split qwen3-32b $tp ""; done
fi
ls -la "$OUT"
