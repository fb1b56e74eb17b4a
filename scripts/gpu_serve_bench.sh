#!/usr/bin/env bash
# Serving benchmark on the GPU machine (issue 11). `tachyon serve` over the qwen3-0.6b config with
# a word-level stand-in tokenizer (dummy weights, --max-model-len 4096), measured by
# `tachyon bench serve` with exactly the options of `vllm bench serve` in the issue: random
# 512 in / 256 out, ignore_eos, seed 0; 256 prompts at 64 req/s, 256 at inf, 1024 at 64 req/s.
# Results (vLLM's JSON fields) in $OUT/tachyon_<label>.json, the server log in $OUT/server.log.
#
# The GPU image lacks fastapi, uvicorn, pydantic, pyzmq and msgspec: they come from vLLM's site
# dir /root/vsite when the peer bundle is installed (../shared/peer/README.md; serve_compare.sh
# there runs vLLM's own client against both servers), else from wheels carried in .whl/.
# VLLM_CLIENT=1 also runs vLLM's client (needs /root/vsite) against the same tachyon server.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
PORT=${PORT:-8123}
M=${MODEL_DIR:-/tmp/qwen3-0.6b-wordlevel}
DEPS=
if [[ -d /root/vsite ]]; then
  DEPS=/root/vsite
elif [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && DEPS=/tmp/site
fi
export PYTHONPATH=$PWD/src${DEPS:+:$DEPS} PYTHONUNBUFFERED=1
export TACHYON_CACHE_DIR=${TACHYON_CACHE_DIR:-/tmp/tc} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 scripts/wordlevel_model_dir.py qwen3-0.6b "$M" || exit 1

python3 -m tachyon.entrypoints.cli serve "$M" --load-format dummy --max-model-len 4096 \
    --port "$PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
up=0
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && { up=1; break; }
  kill -0 $SERVER 2>/dev/null || break
  sleep 1
done
if [[ $up != 1 ]]; then echo "tachyon serve did not come up"; tail -20 "$OUT/server.log"; exit 1; fi

api_cpu() {  # API process CPU seconds, then the core's counters: steps, step/wait/loop/send s
  awk '{print ($14 + $15) / 100}' /proc/$SERVER/stat
  curl -s "http://127.0.0.1:$PORT/metrics" | awk '
    /^tachyon:engine_steps_total /{a=$2} /^tachyon:engine_step_seconds_total /{b=$2}
    /^tachyon:engine_wait_seconds_total /{c=$2} /^tachyon:engine_loop_seconds_total /{d=$2}
    /^tachyon:engine_send_seconds_total /{e=$2} END {print a; print b; print c; print d; print e}'
}
bench() {  # $1 = label, $2 = request rate, $3 = number of prompts
  local before; before=($(api_cpu))
  ${API_PROFILE_WRAP:-} python3 -m tachyon.entrypoints.cli bench serve --backend openai --base-url "http://127.0.0.1:$PORT" \
      --endpoint /v1/completions --model "$M" --tokenizer "$M" --dataset-name random \
      --random-input-len 512 --random-output-len 256 --num-prompts "$3" --request-rate "$2" \
      --ignore-eos --seed 0 --save-result --result-dir "$OUT" --result-filename "tachyon_$1.json" \
      2>&1 | tail -22
  local after; after=($(api_cpu))
  # Where a served step's time goes: the API process's CPU per engine step, and in the core
  # the step (blocked on the device vs host work) and the loop around it (outputs sent).
  awk -v l="$1" -v c="${after[0]}" -v c0="${before[0]}" -v s="${after[1]}" -v s0="${before[1]}" \
      -v t="${after[2]}" -v t0="${before[2]}" -v w="${after[3]}" -v w0="${before[3]}" \
      -v lp="${after[4]}" -v lp0="${before[4]}" -v sd="${after[5]}" -v sd0="${before[5]}" \
      'BEGIN {n = s - s0; if (n < 1) n = 1; k = 1000 / n;
              printf "%s: %d steps; API process CPU %.2f ms/step; core loop %.2f ms/step = step %.2f (device wait %.2f, host %.2f) + send %.2f + rest %.2f\n",
                     l, s - s0, k * (c - c0), k * (lp - lp0), k * (t - t0), k * (w - w0),
                     k * ((t - t0) - (w - w0)), k * (sd - sd0), k * ((lp - lp0) - (t - t0) - (sd - sd0))}' \
      | tee -a "$OUT/api_cpu.txt"
}
status=0
bench rate64 64 256 || status=1
bench rate_inf inf 256 || status=1
bench rate64_n1024 64 1024 || status=1
if [[ ${VLLM_CLIENT:-0} == 1 && -d /root/vsite ]]; then
  ( source /root/vsite/env.sh; export PYTHONPATH=/root/vsite
    timeout 300 python3 -m vllm.entrypoints.cli.main bench serve --backend openai \
      --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions --model "$M" --tokenizer "$M" \
      --dataset-name random --random-input-len 512 --random-output-len 256 --num-prompts 256 \
      --request-rate 64 --ignore-eos --seed 0 --save-result --result-dir "$OUT" \
      --result-filename vllm_client_rate64.json 2>&1 | grep -v -E "WARNING|it/s\]" | tail -28 )
fi
kill $SERVER; wait $SERVER 2>/dev/null
tail -3 "$OUT/server.log"
exit $status
