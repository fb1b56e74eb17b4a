#!/usr/bin/env bash
# Issue 11's measurement in one GPU call: vLLM's own `vllm bench serve` client against
# `vllm serve` and then `tachyon serve`, the same dummy qwen3-0.6b dir (the peer bundle's
# word-level stand-in tokenizer), --max-model-len 4096, random 512 in / 256 out, ignore_eos,
# seed 0, for three loads: 256 prompts at 64 req/s, 256 at inf, 1024 at 64 req/s.
# Needs the peer bundle installed (/root/vsite, ../shared/peer/README.md). Results:
# $OUT/serve_<engine>_<load>.json (vLLM's fields) and, for tachyon, the per-step breakdown
# (API process CPU; core step = device wait + host; outputs sent) in $OUT/breakdown.txt.
# PROFILE=1 adds a fourth tachyon run at 64 req/s with both processes under cProfile.
# Results carry per-request TTFTs (--save-detailed); LOADS="rate64:64:256 rate64b:64:256 ..."
# runs a load twice on the same server (is a TTFT tail a first-run cost?).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}; mkdir -p "$OUT"
M=${MODEL_DIR:-/root/qwen3-0.6b-dummy}
LOADS=${LOADS:-"rate64:64:256 inf:inf:256 n1024:64:1024"}
source /root/vsite/env.sh
python3 -c "import sys; sys.path.insert(0, '/root/vbundle'); import peer_bench; peer_bench.build_model_dir('$M', tokenizer=True)"
T0=$(date +%s); stamp() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }

wait_up() {  # $1 port, $2 pid
  for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
client() {  # $1 = result name, $2 = port, $3 = rate, $4 = prompts
  ( export PYTHONPATH=/root/vsite
    timeout 200 python3 -m vllm.entrypoints.cli.main bench serve --backend openai \
      --base-url "http://127.0.0.1:$2" --endpoint /v1/completions --model "$M" --tokenizer "$M" \
      --dataset-name random --random-input-len 512 --random-output-len 256 --num-prompts "$4" \
      --request-rate "$3" --ignore-eos --seed 0 --save-result --save-detailed --result-dir "$OUT" \
      --result-filename "serve_$1.json" 2>&1 | tr '\r' '\n' \
      | grep -E "Successful|Benchmark duration|Output token throughput|Mean TTFT|P99 TTFT|Mean TPOT|P99 TPOT|Mean ITL|Failed" )
}
counters() {  # $1 port, $2 pid: API CPU s, core steps, step s, wait s, loop s, send s
  awk '{print ($14 + $15) / 100}' "/proc/$2/stat"
  curl -s "http://127.0.0.1:$1/metrics" | awk '
    /^tachyon:engine_steps_total /{a=$2} /^tachyon:engine_step_seconds_total /{b=$2}
    /^tachyon:engine_wait_seconds_total /{c=$2} /^tachyon:engine_loop_seconds_total /{d=$2}
    /^tachyon:engine_send_seconds_total /{e=$2} END {print a; print b; print c; print d; print e}'
}
breakdown() {  # $1 label, then the counters before and after
  local l=$1; shift
  awk -v l="$l" -v c0="$1" -v s0="$2" -v t0="$3" -v w0="$4" -v lp0="$5" -v sd0="$6" \
      -v c="$7" -v s="$8" -v t="$9" -v w="${10}" -v lp="${11}" -v sd="${12}" \
      'BEGIN {n = s - s0; if (n < 1) n = 1; k = 1000 / n;
              printf "%s: %d steps; API CPU %.2f ms/step; core loop %.2f ms/step = step %.2f (device wait %.2f + host %.2f) + send %.2f + inputs/rest %.2f\n",
                     l, s - s0, k * (c - c0), k * (lp - lp0), k * (t - t0), k * (w - w0),
                     k * ((t - t0) - (w - w0)), k * (sd - sd0), k * ((lp - lp0) - (t - t0) - (sd - sd0))}' \
      | tee -a "$OUT/breakdown.txt"
}

if [[ ${SKIP_VLLM:-0} != 1 ]]; then
  stamp "vllm serve"
  ( export PYTHONPATH=/root/vsite
    exec python3 -m vllm.entrypoints.cli.main serve "$M" --load-format dummy --port 8100 \
      --max-model-len 4096 ) > "$OUT/vllm_serve.log" 2>&1 &
  VP=$!
  if wait_up 8100 $VP; then
    stamp "vllm up"
    for load in $LOADS; do IFS=: read -r name rate n <<< "$load"
      echo "== vllm $name"; client "vllm_$name" 8100 "$rate" "$n"; done
  else echo "vllm serve failed"; tail -20 "$OUT/vllm_serve.log"; fi
  kill $VP; wait $VP 2>/dev/null
fi

tachyon_run() {  # $1 = tag; runs every load against a fresh tachyon serve
  stamp "tachyon serve $1"
  ( export PYTHONPATH=$PWD/src:/root/vsite TACHYON_CACHE_DIR=/tmp/tc HF_HUB_OFFLINE=1
    exec python3 -m tachyon.entrypoints.cli serve "$M" --load-format dummy --port 8200 \
      --max-model-len 4096 ${TACHYON_FLAGS:-} ) > "$OUT/tachyon_serve_$1.log" 2>&1 &
  local TP=$!
  if wait_up 8200 $TP; then
    stamp "tachyon up"
    for load in ${2:-$LOADS}; do IFS=: read -r name rate n <<< "$load"
      echo "== tachyon$1 $name"
      local before; before=($(counters 8200 $TP))
      client "tachyon$1_$name" 8200 "$rate" "$n"
      local after; after=($(counters 8200 $TP))
      breakdown "tachyon$1 $name" "${before[@]}" "${after[@]}"
    done
  else echo "tachyon serve failed"; tail -20 "$OUT/tachyon_serve_$1.log"; fi
  kill -INT $TP; wait $TP 2>/dev/null
  tail -3 "$OUT/tachyon_serve_$1.log"
}
tachyon_run ""
if [[ ${PROFILE:-0} == 1 ]]; then
  TACHYON_PROFILE_DIR=$OUT/prof tachyon_run "_prof" "rate64:64:256"
  for f in "$OUT"/prof/*.prof; do
    echo "== $f"; python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(25)" "$f" 2>&1 | tail -32
  done
fi
stamp done
