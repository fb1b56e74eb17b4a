"""Issue 18 probe: FULL-graph mixed batches with earlier context, and the varlen kernel's
tile choices against a float64 reference on the GPU. Prints a table; JSON to $OUT."""
from __future__ import annotations

import json
import os
import random
import sys
import time

import torch

from tachyon import LLM, SamplingParams
from tachyon.attention.kernels import unified as K


def ref_attention(q, kc, vc, qsl, seq_lens, bt, scale):
    out = torch.zeros_like(q, dtype=torch.float64)
    bs = kc.shape[1]
    hq, hk = q.shape[1], kc.shape[2]
    for r in range(len(seq_lens)):
        a, b = int(qsl[r]), int(qsl[r + 1])
        L = int(seq_lens[r])
        if b == a or L == 0:
            continue
        pos = torch.arange(L, device=q.device)
        blk = bt[r, pos // bs].long()
        k = kc[blk, pos % bs].double()  # [L, hk, d]
        v = vc[blk, pos % bs].double()
        k = k.repeat_interleave(hq // hk, 1)
        v = v.repeat_interleave(hq // hk, 1)
        qq = q[a:b].double()
        s = torch.einsum("thd,lhd->htl", qq, k) * scale
        qpos = L - (b - a) + torch.arange(b - a, device=q.device)
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[a:b] = torch.einsum("htl,lhd->thd", s.softmax(-1), v)
    return out


def kernel_probe(results):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    for hq, hk, d in [(32, 8, 64), (16, 8, 128)]:
        for dtype in (torch.float32, torch.bfloat16):
            nb, bs = 400, 16
            kc = torch.randn(nb, bs, hk, d, device=dev, dtype=dtype)
            vc = torch.randn(nb, bs, hk, d, device=dev, dtype=dtype)
            # requests: (q_len, context) ; padded to R requests
            reqs = [(10, 192), (32, 2048), (1, 300), (1, 5), (16, 2064), (9, 144)]
            R = 16
            qlens = [q for q, _ in reqs] + [1] * 3 + [0] * (R - len(reqs) - 3)
            ctx = [c for _, c in reqs] + [0] * (R - len(reqs))
            T = 96
            qsl = torch.zeros(R + 1, dtype=torch.int32)
            qsl[1:] = torch.tensor(qlens).cumsum(0)
            seq = torch.tensor([q + c if i < len(reqs) else 0 for i, (q, c) in
                                enumerate(zip(qlens, ctx, strict=True))], dtype=torch.int32)
            maxb = 4096 // bs + 1
            bt = torch.randint(0, nb, (R, maxb), dtype=torch.int32)
            q = torch.randn(T, hq, d, device=dev, dtype=dtype)
            qsl_d, seq_d, bt_d = qsl.to(dev), seq.to(dev), bt.to(dev)
            ref = ref_attention(q, kc, vc, qsl, seq, bt_d, d ** -0.5)
            n_real = int(qsl[len(reqs)])
            for tiles in ("decode", "prefill"):
                old = K._DECODE_LIKE_TOKENS_PER_REQ
                K._DECODE_LIKE_TOKENS_PER_REQ = 10**6 if tiles == "decode" else 0
                out = torch.zeros_like(q)
                K.unified_attention(q, kc, vc, out, qsl_d, seq_d, bt_d, d ** -0.5, R)
                K._DECODE_LIKE_TOKENS_PER_REQ = old
                err = (out[:n_real].double() - ref[:n_real]).abs().max().item()
                results.append({"probe": "kernel", "heads": [hq, hk, d], "dtype": str(dtype),
                                "tiles": tiles, "max_err": err})
                print(f"kernel hq={hq} hk={hk} d={d} {dtype} tiles={tiles}: max err {err:.2e}")


def engine_probe(results, model, mode, async_sched, tiles):
    if tiles == "prefill":
        K._DECODE_LIKE_TOKENS_PER_REQ = 0
    else:
        K._DECODE_LIKE_TOKENS_PER_REQ = 4
    llm = LLM(model, load_format="dummy", dtype="float32", max_model_len=4096, max_num_seqs=256,
              max_num_batched_tokens=2048, gpu_memory_utilization=0.6, cudagraph_mode=mode,
              async_scheduling=async_sched)
    rng = random.Random(0)
    head = [rng.randrange(20000) for _ in range(700)]
    prompts = [head + [rng.randrange(20000) for _ in range(1380)],
               [rng.randrange(20000) for _ in range(202)],
               [rng.randrange(20000) for _ in range(153)]]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tog = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    llm.shutdown()
    del llm
    K._DECODE_LIKE_TOKENS_PER_REQ = 4
    return tog, alone


def _patch(kind):
    from tachyon.worker import input_buffers, model_runner
    if kind == "sync_stage":
        orig = model_runner.ModelRunner._stage
        def stage(self, out):
            torch.cuda.current_stream().synchronize()
            return orig(self, out)
        model_runner.ModelRunner._stage = stage
    elif kind == "sync_copy":
        orig = input_buffers.InputBuffers.copy_to_device
        def copy(self, n):
            orig(self, n)
            torch.cuda.current_stream().synchronize()
        input_buffers.InputBuffers.copy_to_device = copy
    elif kind == "sync_sampling":
        orig = input_buffers.SamplingBuffers.stage
        def st(self, rows, top_k):
            orig(self, rows, top_k)
            torch.cuda.current_stream().synchronize()
        input_buffers.SamplingBuffers.stage = st


def main():
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    results = []
    if os.environ.get("KERNEL_PROBE", "1") == "1":
        kernel_probe(results)
    model = sys.argv[1] if len(sys.argv) > 1 else "llama-3.2-1b"
    t0 = time.time()
    base_t, base_a = engine_probe(results, model, "NONE", None, "auto")
    print(f"NONE together==alone: {base_t == base_a}", flush=True)
    variants = [("FULL", None, "auto"), ("FULL", False, "auto"),
                ("FULL", None, "prefill"), ("FULL_AND_PIECEWISE", None, "auto")]
    if os.environ.get("VARIANTS"):
        variants = [variants[int(i)] for i in os.environ["VARIANTS"].split(",")]
    if os.environ.get("PATCH"):
        _patch(os.environ["PATCH"])
    for mode, asy, tiles in variants:
        t, a = engine_probe(results, model, mode, asy, tiles)
        row = {"mode": mode, "async": asy, "tiles": tiles,
               "together_eq_none": [x == y for x, y in zip(t, base_t, strict=True)],
               "alone_eq_none": [x == y for x, y in zip(a, base_a, strict=True)],
               "together_eq_alone": [x == y for x, y in zip(t, a, strict=True)]}
        results.append(row)
        print(row, f"{time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(out_dir, "repro18.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
