#!/usr/bin/env bash
# FlexAttention on the GPU: decode latency under PIECEWISE and FULL (B=1, 64), and the
# standard throughput workload, flex against triton.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m tachyon.entrypoints.cli bench latency --attention-backend flex \
    --modes PIECEWISE-breakable FULL --batch-sizes 1 64 --json "$OUT/latency_flex.json" 2>&1 | tail -4
python3 -m tachyon.entrypoints.cli bench throughput --attention-backend flex \
    --json "$OUT/throughput_flex.json" 2>&1 | tr '\r' '\n' | grep -E "^tok/s|fraction"
