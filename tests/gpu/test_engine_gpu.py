"""The GPU path end to end: tachyon against HF transformers, and batch invariance."""

from __future__ import annotations

import random

import pytest
import torch

from tachyon import LLM, SamplingParams

pytestmark = pytest.mark.gpu

TOP = 20


def _hf_qwen3_with_tachyon_dummy_weights(llm: LLM, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from tachyon.loader.weights import iterate_dummy

    cfg = llm.engine.config.model.hf_config
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    state = dict(iterate_dummy(cfg, llm.engine.config.model.seed, torch.device("cuda"), dtype))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), missing
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


@torch.inference_mode()
def test_qwen3_dummy_logprobs_match_hf_bf16():
    llm = LLM("qwen3-0.6b", load_format="dummy", max_model_len=1024,
              gpu_memory_utilization=0.4, cudagraph_mode="NONE")
    try:
        hf = _hf_qwen3_with_tachyon_dummy_weights(llm, torch.bfloat16)
        prompt = [random.randrange(10000) for _ in range(77)]
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=33, logprobs=TOP,
                                                    ignore_eos=True), use_tqdm=False)[0]
        tokens = out.outputs[0].token_ids
        seq = list(prompt)
        errs = []
        for step, lp in enumerate(out.outputs[0].logprobs):  # prefill + 32 decode steps
            logits = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float()
            ref = torch.log_softmax(logits, -1)
            ids = list(lp)
            ours = torch.tensor([lp[i] for i in ids])
            theirs = ref[ids].cpu()
            errs.append(((ours - theirs).norm() / theirs.norm()).item())
            seq.append(tokens[step])
        assert max(errs) < 2e-2, errs
    finally:
        llm.shutdown()


def test_batch_equals_alone_fp32():
    llm = LLM("qwen3-0.6b", load_format="dummy", dtype="float32", max_model_len=1024,
              max_num_batched_tokens=512, gpu_memory_utilization=0.5)
    try:
        rng = random.Random(7)
        prompts = [[rng.randrange(10000) for _ in range(rng.randint(5, 300))] for _ in range(64)]
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        assert together == alone
    finally:
        llm.shutdown()
