"""Start-up seconds of one engine (run twice to see the compile cache at work)."""

import json
import sys
import time

t0 = time.perf_counter()
from tachyon import LLM  # noqa: E402

mode, pw = sys.argv[1], sys.argv[2]
llm = LLM("qwen3-0.6b", load_format="dummy", max_model_len=4096, cudagraph_mode=mode,
          compilation_config={"piecewise_backend": pw})
print(json.dumps({"mode": mode, "piecewise_backend": pw,
                  "startup_s": round(time.perf_counter() - t0, 2),
                  **llm.engine.executor.graph_stats}))
