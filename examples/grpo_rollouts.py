"""GRPO-style reinforcement learning with tachyon as the rollout engine, on a CPU.

The policy is a tiny random Llama, written with transformers to a temporary directory; the
same HF model object is trained with plain PyTorch. Each step:

1. tachyon samples a group of ``G`` completions per prompt
   (``SamplingParams(n=G, temperature=1.0, seed=...)``, with the sampled tokens' logprobs);
2. a verifiable reward scores each completion: the fraction of its tokens that are
   ``--target-token``;
3. advantages are normalised within each group (GRPO: ``(r - mean) / (std + eps)``, no value
   model);
4. one policy-gradient step on the HF model (on-policy, so PPO's ratio is 1 and its clip is
   moot; no KL term, to keep the example short);
5. ``llm.update_weights(model.named_parameters())`` pushes the new weights into the running
   engine, in place.

It prints the mean reward per step, which rises, and the largest gap between tachyon's
logprob of a sampled token and the trainer's: float noise only, because the engine samples
from exactly the weights being trained.

    python examples/grpo_rollouts.py --steps 15
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tachyon import LLM, SamplingParams

# The policy: small enough that a step (sampling, training, weight sync) takes well under a
# second on one CPU core; 2 layers so attention and the MLP both learn.
VOCAB_SIZE = 32
TINY_LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=1)
# Std of each group's rewards is divided by this much at least: all-equal groups give 0.
ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class StepStats:
    step: int
    mean_reward: float
    max_logprob_gap: float  # |tachyon - trainer| over the sampled tokens
    sample_s: float
    train_s: float
    sync_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per completion")
    p.add_argument("--target-token", type=int, default=7, help="the token the reward counts")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_policy(root: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    """A random tiny Llama checkpoint for tachyon, and the same model for the trainer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    path = root / "policy"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def reward(tokens: list[int], target: int) -> float:
    """Verifiable: the fraction of the completion's tokens that are the target token."""
    return sum(t == target for t in tokens) / len(tokens)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` [prompts, G] -> advantages normalised within each prompt's group."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def token_logprobs(model: torch.nn.Module, prompts: torch.Tensor,
                   completions: torch.Tensor) -> torch.Tensor:
    """The trainer's log-probabilities of each completion token: [sequences, tokens]."""
    ids = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=ids[:, :-1]).logits[:, prompts.shape[1] - 1:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completions[..., None])[..., 0]


def rollout(llm: LLM, prompts: list[list[int]], args: argparse.Namespace,
            step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G completions per prompt: (token ids [prompts * G, T], tachyon's logprobs of them)."""
    g = args.group_size
    params = [SamplingParams(n=g, temperature=1.0, max_tokens=args.max_tokens,
                             ignore_eos=True, logprobs=0,
                             seed=args.seed * 1_000_003 + (step * len(prompts) + i) * g)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    samples = [c for o in outs for c in o.outputs]
    tokens = torch.tensor([c.token_ids for c in samples])
    logprobs = torch.tensor([[lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
                             for c in samples])
    return tokens, logprobs


def train(args: argparse.Namespace) -> list[StepStats]:
    g_prompts = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(2, VOCAB_SIZE, (args.prompts, args.prompt_len),
                            generator=g_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        path, model = write_policy(Path(tmp), args.seed)
        llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64,
                  max_num_seqs=args.prompts * args.group_size, kv_cache_memory="8MiB")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    try:
        for step in range(args.steps):
            history.append(one_step(llm, model, optimizer, prompts, args, step))
            print(format_stats(history[-1]), flush=True)
    finally:
        llm.shutdown()
    return history


def one_step(llm: LLM, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             prompts: torch.Tensor, args: argparse.Namespace, step: int) -> StepStats:
    start = time.perf_counter()
    completions, engine_logprobs = rollout(llm, prompts.tolist(), args, step)
    sampled = time.perf_counter()
    rewards = torch.tensor([reward(c, args.target_token) for c in completions.tolist()])
    advantages = group_advantages(rewards.view(args.prompts, args.group_size)).flatten()
    repeated = prompts.repeat_interleave(args.group_size, dim=0)  # completions are grouped
    logprobs = token_logprobs(model, repeated, completions)
    gap = float((logprobs.detach() - engine_logprobs).abs().max())
    # Per-token policy gradient: each token of a completion carries its group advantage.
    loss = -(advantages[:, None] * logprobs).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    trained = time.perf_counter()
    llm.update_weights(model.named_parameters())
    synced = time.perf_counter()
    return StepStats(step, float(rewards.mean()), gap, sampled - start, trained - sampled,
                     synced - trained)


def format_stats(s: StepStats) -> str:
    return (f"step {s.step:3d}  mean reward {s.mean_reward:.3f}  "
            f"max |logprob gap| {s.max_logprob_gap:.1e}  "
            f"(sample {s.sample_s:.2f} s, train {s.train_s:.2f} s, sync {s.sync_s:.3f} s)")


if __name__ == "__main__":
    train(parse_args())
