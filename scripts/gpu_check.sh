#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, kernel bandwidth, throughput and latency benchmarks.
# Writes everything under $OUT (default ./out) and prints a short table last.
#   bash scripts/gpu_check.sh [tests|bench|all]   (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TACHYON_CACHE_DIR=${TACHYON_CACHE_DIR:-/tmp/tachyon-cache}
what=${1:-all}
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$py -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'

if [[ $what == tests || $what == all ]]; then
  $py -m pytest -q tests/gpu ${GPU_TEST_ARGS:-} --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  $py -m tachyon.bench.kernel_bench > "$OUT/kernel_bench.json" 2> "$OUT/kernel_bench.err"
  $py -m tachyon.entrypoints.cli bench throughput --cudagraph-mode NONE \
      --json "$OUT/throughput_none.json" 2>&1 | grep -v "Processed prompts" | tail -12
  $py -m tachyon.entrypoints.cli bench throughput --cudagraph-mode FULL_AND_PIECEWISE \
      --json "$OUT/throughput_fp.json" --plot "$OUT/throughput.png" 2>&1 | grep -v "Processed prompts" | tail -12
  $py -m tachyon.entrypoints.cli bench latency --json "$OUT/latency.json" --plot "$OUT/latency.png" 2>&1 | tail -12
fi
$py - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1]); summary = {}
for f in sorted(out.glob("*.json")):
    try: summary[f.stem] = json.loads(f.read_text())
    except Exception as e: summary[f.stem] = {"error": str(e)}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
for name in ("throughput_none", "throughput_fp"):
    r = summary.get(name)
    if r and "tok_per_s" in r:
        print(f"{name:18} {r['tok_per_s']:9.0f} tok/s  floor {r.get('floor_tok_per_s', 0):8.0f}  fraction {r.get('fraction_of_floor', 0):.3f}")
k = summary.get("kernel_bench")
if k: print("kernel_bench", {a: k[a] for a in k if "gbps" in a or "fraction" in a})
PY
