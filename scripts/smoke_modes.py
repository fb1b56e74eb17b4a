"""Quick GPU smoke: build each graph mode, generate a few prompts, compare with NONE."""

import random
import sys
import time

from tachyon import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
backend = sys.argv[2] if len(sys.argv) > 2 else "triton"
rng = random.Random(0)
prompts = [[rng.randrange(10000) for _ in range(rng.randint(5, 200))] for _ in range(13)]
sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ref = None
DEFAULT_MODES = [("NONE", "breakable"), ("FULL", "breakable"), ("PIECEWISE", "breakable"),
                 ("FULL_AND_PIECEWISE", "breakable"), ("PIECEWISE", "compile")]
modes = ([tuple(m.split(":")) for m in sys.argv[3].split(",")] if len(sys.argv) > 3
         else DEFAULT_MODES)
for mode, pw in modes:
    t = time.perf_counter()
    try:
        llm = LLM(model, load_format="dummy", dtype="float32", max_model_len=1024,
                  max_num_seqs=64, gpu_memory_utilization=0.4, attention_backend=backend,
                  cudagraph_mode=mode, compilation_config={"piecewise_backend": pw})
        start = time.perf_counter() - t
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        ref = ref or out
        print(f"{mode:20} {pw:10} start {start:6.1f}s same_as_NONE={out == ref} "
              f"{llm.engine.executor.startup_report}", flush=True)
        llm.shutdown()
    except Exception as e:  # report and go on to the next mode
        import traceback

        traceback.print_exc()
        print(f"{mode:20} {pw:10} FAILED {type(e).__name__}: {e}", flush=True)
