#!/usr/bin/env bash
# Serving benchmark on the GPU machine: start `tachyon serve` (qwen3-0.6b dummy), replay the
# standard workload at two request rates with `tachyon bench serve`, stop the server.
# The GPU image lacks fastapi/uvicorn/pydantic: carry their wheels in .whl/ (README, Development).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PORT=${PORT:-8123}
python3 -m tachyon.entrypoints.cli serve qwen3-0.6b --load-format dummy --max-model-len 4096 \
    --port "$PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/server.log"; exit 1; }
  sleep 1
done
for rate in ${RATES:-16 64}; do
  python3 -m tachyon.entrypoints.cli bench serve --base-url "http://127.0.0.1:$PORT" \
      --dataset standard --num-prompts ${NUM_PROMPTS:-256} --request-rate "$rate" \
      --json "$OUT/serve_rate$rate.json" 2>&1 | tail -14
done
kill $SERVER; wait $SERVER 2>/dev/null
