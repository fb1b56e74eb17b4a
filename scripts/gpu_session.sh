#!/usr/bin/env bash
# One GPU call for a session's checks, most important first, each step under its own timeout:
# the serving benchmark, the GPU tests of the session's features, the RL weight-sync bench.
# Everything lands under $OUT; a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}; mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
export TOKENIZERS_PARALLELISM=false
stamp serve; timeout "${SERVE_S:-150}" bash scripts/gpu_serve_bench.sh > "$OUT/serve.txt" 2>&1
echo "serve rc=$?" >> "$OUT/summary.txt"
grep -E "Output token throughput|Mean TTFT|P99 TTFT|Mean TPOT|P99 TPOT|API process" "$OUT/serve.txt" | tee -a "$OUT/summary.txt"
stamp tests
PYTHONPATH=src timeout "${TESTS_S:-170}" python3 -m pytest -q -p no:cacheprovider -x \
    "tests/gpu/test_long_context_modes.py::test_long_context_tokens_match_eager[llama-3.2-1b-triton-FULL-breakable]" \
    tests/gpu/test_lora_gpu.py tests/gpu/test_engine_gpu.py \
    "tests/gpu/test_spec_decode_gpu.py::test_ngram_greedy_identical_in_every_mode[3]" \
    > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/summary.txt"; tail -4 "$OUT/tests.txt" >> "$OUT/summary.txt"
stamp rl
PYTHONPATH=src timeout "${RL_S:-60}" python3 scripts/gpu_rl_bench.py --models qwen3-0.6b --repeats 3 \
    > "$OUT/rl.txt" 2>&1
echo "rl rc=$?" >> "$OUT/summary.txt"; tail -12 "$OUT/rl.txt" >> "$OUT/summary.txt"
stamp done
cat "$OUT/summary.txt"
