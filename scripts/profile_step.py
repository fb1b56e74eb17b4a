"""Profile decode steps: host time by function (cProfile) and device time by kernel."""

import cProfile
import pstats
import random
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from tachyon import LLM, SamplingParams

mode = sys.argv[1] if len(sys.argv) > 1 else "FULL"
pw = sys.argv[2] if len(sys.argv) > 2 else "breakable"
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
llm = LLM("qwen3-0.6b", load_format="dummy", max_model_len=2048, max_num_seqs=256,
          gpu_memory_utilization=0.5, cudagraph_mode=mode,
          compilation_config={"piecewise_backend": pw})
eng = llm.engine
rng = random.Random(0)
for i in range(batch):
    eng.add_request(str(i), [rng.randrange(10000) for _ in range(512)],
                    SamplingParams(temperature=0, ignore_eos=True, max_tokens=200))
for _ in range(10):
    eng.step()
prof = cProfile.Profile()
prof.enable()
for _ in range(50):
    eng.step()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(10):
        eng.step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
print(p.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
