"""n-gram speculative decoding against plain decoding on a real model (issue 14).

A copy-heavy workload — chat prompts asking the model to repeat, or lightly correct, a given
passage — run greedy at batch sizes 1, 8 and 64, with and without ``--speculative-config
'{"method": "ngram", ...}'``, per CUDA graph mode. Greedy speculation must give the same
tokens as plain decoding (checked: a mismatch fails the run); the table reports output tok/s,
the speed-up, the acceptance rate and the mean accepted length per verify pass.

    python scripts/gpu_spec_bench.py --model /root/x/smollm2.gguf --out $OUT/spec

Writes ``<out>.json`` and ``<out>.png``; exits 1 if a run fails or the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

SENTENCES = [
    "The river rose slowly through the night, and by morning the lower fields were under water.",
    "Maria checked the invoice twice before she sent it to the accounting department.",
    "A cache miss costs far more than an arithmetic instruction on a modern processor.",
    "The committee will meet on Thursday to review the budget for the new library wing.",
    "He packed a map, two apples, a flashlight and a spare pair of socks for the hike.",
    "Photosynthesis converts light energy into chemical energy stored in sugar molecules.",
    "Our train was delayed by forty minutes because of a signal failure near the bridge.",
    "The recipe asks for three eggs, a cup of flour and a pinch of salt.",
    "Please restart the server after you have applied the security update.",
    "The museum opens at nine and closes at five, except on public holidays.",
    "Every function in this module returns a new list instead of changing its argument.",
    "The old lighthouse keeper wrote the weather in his logbook every evening.",
]
TYPOS = {"the": "teh", "and": "adn", "with": "wiht", "before": "befor", "because": "becuase"}


def passages(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(SENTENCES, rng.randint(4, 7))) for _ in range(n)]


def conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    convs = []
    for i, text in enumerate(passages(n, seed)):
        if i % 2:
            bad = " ".join(TYPOS.get(w, w) for w in text.split())
            ask = f"Fix the spelling mistakes in this text and return the corrected text:\n\n{bad}"
        else:
            ask = f"Repeat the following text exactly, word for word:\n\n{text}"
        convs.append([{"role": "user", "content": ask}])
    return convs


def run(ns: argparse.Namespace, mode: str, spec: dict[str, Any] | None) -> dict[int, Any]:
    from tachyon import LLM, SamplingParams

    llm = LLM(ns.model, max_model_len=2048, cudagraph_mode=mode,
              gpu_memory_utilization=0.5, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens)
    out = {}
    try:
        llm.chat(conversations(2, 99), params)  # warm-up: first shapes, lazy paths
        for b in ns.batches:
            convs = conversations(b, b)
            before = dict(llm.engine.stats)
            start = time.perf_counter()
            res = llm.chat(convs, params)
            seconds = time.perf_counter() - start
            after = llm.engine.stats
            tokens = [r.outputs[0].token_ids for r in res]
            row = {"seconds": seconds, "tokens": tokens,
                   "tok_s": sum(map(len, tokens)) / seconds}
            if spec is not None:
                drafts = after["spec_draft_tokens"] - before["spec_draft_tokens"]
                acc = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
                ver = after["spec_verifies"] - before["spec_verifies"]
                row.update(acceptance=acc / drafts if drafts else 0.0,
                           mean_accepted_length=1 + acc / ver if ver else 1.0)
            out[b] = row
    finally:
        llm.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--modes", nargs="+", default=["FULL_AND_PIECEWISE", "FULL"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default="spec_bench")
    ns = ap.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": ns.k, "prompt_lookup_min": 2,
            "prompt_lookup_max": 5}
    results: dict[str, Any] = {"model": ns.model, "k": ns.k, "modes": {}}
    failed = []
    rows = []
    for mode in ns.modes:
        try:
            base = run(ns, mode, None)
            fast = run(ns, mode, spec)
        except Exception as e:  # one line, the rest of the modes still run
            failed.append(f"{mode}: {e!r}")
            continue
        results["modes"][mode] = {"plain": base, "ngram": fast}
        for b in ns.batches:
            same = base[b]["tokens"] == fast[b]["tokens"]
            if not same:
                failed.append(f"{mode} B={b}: speculative tokens differ from plain greedy")
            rows.append((mode, b, base[b]["tok_s"], fast[b]["tok_s"],
                         fast[b]["tok_s"] / base[b]["tok_s"], fast[b]["acceptance"],
                         fast[b]["mean_accepted_length"], same))
    print(f"| mode | B | plain tok/s | ngram k={ns.k} tok/s | speed-up | acceptance "
          f"| mean accepted length | same tokens |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:,.0f} | {r[3]:,.0f} | {r[4]:.2f}x | {r[5]:.2f} "
              f"| {r[6]:.2f} | {r[7]} |")
    for mode in results["modes"].values():  # token lists are bulky: keep their lengths
        for run_ in mode.values():
            for row in run_.values():
                row["tokens"] = [len(t) for t in row["tokens"]]
    results["failed"] = failed
    Path(f"{ns.out}.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in results["modes"]:
            ax.plot([r[1] for r in rows if r[0] == mode], [r[4] for r in rows if r[0] == mode],
                    marker="o", label=mode)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over plain decoding")
        ax.set_title(f"n-gram speculation (k={ns.k}), copy-heavy prompts")
        ax.legend()
        fig.savefig(f"{ns.out}.png", dpi=100, bbox_inches="tight")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    for f in failed:
        print("FAILED:", f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
