#!/usr/bin/env bash
# Issue 12's speed check in one GPU call: the standard throughput workload and the decode
# step latency (B=1 and 64) of HEAD (./src) against an earlier tree's src/ (OLD, default
# /root/old/src, from `scripts/pack_device_carry.sh BASE`), alternating old/new so neither
# always runs first (the first run in a lease pays Triton's compilation). qwen3-0.6b dummy,
# FULL_AND_PIECEWISE and FULL. Results in $OUT/ba_<what>_<version>_<round>.json and a table.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}; mkdir -p "$OUT"
OLD=${OLD:-/root/old/src}
export TOKENIZERS_PARALLELISM=false TACHYON_CACHE_DIR=${TACHYON_CACHE_DIR:-/tmp/tc}
run() {  # $1 version, $2 round
  local src=$PWD/src; [[ $1 == old ]] && src=$OLD
  PYTHONPATH=$src timeout "${LAT_S:-120}" python3 -m tachyon.entrypoints.cli bench latency \
      --modes FULL_AND_PIECEWISE FULL --batch-sizes 1 64 --model qwen3-0.6b --load-format dummy \
      --max-model-len 4096 --json "$OUT/ba_lat_$1_$2.json" --no-plot > "$OUT/ba_lat_$1_$2.txt" 2>&1
  echo "latency $1 round $2 rc=$?"
  PYTHONPATH=$src timeout "${TP_S:-120}" python3 -m tachyon.entrypoints.cli bench throughput \
      --model qwen3-0.6b --load-format dummy --json "$OUT/ba_tp_$1_$2.json" --no-plot \
      > "$OUT/ba_tp_$1_$2.txt" 2>&1
  echo "throughput $1 round $2 rc=$?"
}
run old 1; run new 1; run new 2; run old 2
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
print("| tree | round | F&P B=1 | F&P B=64 | FULL B=1 | FULL B=64 | standard tok/s |")
print("|---|---|---|---|---|---|---|")
for v in ("old", "new"):
    for r in (1, 2):
        lat, tp = load(out / f"ba_lat_{v}_{r}.json"), load(out / f"ba_tp_{v}_{r}.json")
        cells = []
        for mode in ("FULL_AND_PIECEWISE", "FULL"):
            m = (lat or {}).get("modes", {}).get(mode, {}).get("steps", {})
            cells += [f"{m[b]['median_ms']:.3f}" if b in m else "-" for b in ("1", "64")]
        tok = "-" if tp is None else f"{tp['tok_per_s']:,.0f}"
        print(f"| {v} | {r} | " + " | ".join(cells) + f" | {tok} |")
PY
