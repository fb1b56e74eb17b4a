"""CPU figures for the engine-core issue, with the embedded default model (SmolLM2-135M).

1. seconds from `tachyon generate` start to its first token (a subprocess, streaming off:
   measured as process start -> first byte of output with --max-tokens 1);
2. single-stream decode tok/s of tachyon and of HF transformers `generate` on the same prompt
   and number of tokens;
3. throughput of 32 prompts generated together.
"""

import json
import os
import subprocess
import sys
import time

import torch

N_TOKENS = 128
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def first_token_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tachyon.entrypoints.cli", "generate", PROMPT,
                    "--max-tokens", "1"], check=True, capture_output=True)
    return time.perf_counter() - start


def tachyon_single_and_batch() -> tuple[float, float]:
    from tachyon import LLM, SamplingParams

    llm = LLM()
    sp = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)
    llm.generate([PROMPT], sp, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate([PROMPT], sp, use_tqdm=False)
    single = N_TOKENS / (time.perf_counter() - start)
    prompts = [f"{PROMPT} Variation {i}." for i in range(32)]
    start = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    batch = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    return single, batch


def hf_single(dtype: torch.dtype = torch.float32) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tachyon.loader.resolve import default_gguf_path

    path = default_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, do_sample=False)
    with torch.inference_mode():
        model.generate(ids, **kw)  # warm-up
        start = time.perf_counter()
        model.generate(ids, **kw)
    return N_TOKENS / (time.perf_counter() - start)


if __name__ == "__main__":
    res = {"first_token_s": first_token_seconds()}
    res["tachyon_single_tok_s"], res["tachyon_32_prompts_tok_s"] = tachyon_single_and_batch()
    res["hf_single_tok_s"] = hf_single()  # transformers' default for this GGUF: float32
    res["hf_single_bf16_tok_s"] = hf_single(torch.bfloat16)
    res["speedup_vs_hf"] = res["tachyon_single_tok_s"] / res["hf_single_tok_s"]
    res["torch_threads"] = torch.get_num_threads()
    print(json.dumps(res, indent=1))
