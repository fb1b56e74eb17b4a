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

With ``--lora`` only a PEFT LoRA adapter is trained (the base weights stay frozen), as
Unsloth's ``fast_inference`` runs it: tachyon samples with the adapter
(``generate(..., lora_request=...)``) and step 5 becomes
``llm.update_lora(lora_request, get_peft_model_state_dict(model))``, a copy of the adapter
alone into its GPU slot.

It prints the mean reward per step, which rises, and the largest gap between tachyon's
logprob of a sampled token and the trainer's: float noise only, because the engine samples
from exactly the weights being trained.

    python examples/grpo_rollouts.py --steps 15
    python examples/grpo_rollouts.py --steps 15 --lora
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tachyon import LLM, LoRARequest, SamplingParams

# The policy: small enough that a step (sampling, training, weight sync) takes well under a
# second on one CPU core; 2 layers so attention and the MLP both learn.
VOCAB_SIZE = 32
TINY_LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=1)
# Std of each group's rewards is divided by this much at least: all-equal groups give 0.
ADVANTAGE_EPS = 1e-4
# The --lora adapter: every projection, rank 8, alpha 64 (scale 8: a few steps move the policy).
LORA_RANK, LORA_ALPHA = 8, 64
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    p.add_argument("--lora", action="store_true",
                   help="train only a LoRA adapter and push it with update_lora")
    return p.parse_args(argv)


def write_policy(root: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    """A random tiny Llama checkpoint for tachyon, and the same model for the trainer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    path = root / "policy"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def add_lora_adapter(model: torch.nn.Module, root: Path) -> tuple[torch.nn.Module, Path]:
    """Wrap the policy in a trainable PEFT LoRA adapter (base frozen) and save the adapter
    as tachyon reads it; PEFT starts B at zero, so the adapter starts as a no-op."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                  target_modules=LORA_TARGETS,
                                                  lora_dropout=0.0))
    path = root / "adapter"
    peft_model.save_pretrained(path, safe_serialization=True)
    return peft_model, path


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


def rollout(llm: LLM, prompts: list[list[int]], args: argparse.Namespace, step: int,
            lora: LoRARequest | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G completions per prompt: (token ids [prompts * G, T], tachyon's logprobs of them)."""
    g = args.group_size
    params = [SamplingParams(n=g, temperature=1.0, max_tokens=args.max_tokens,
                             ignore_eos=True, logprobs=0,
                             seed=args.seed * 1_000_003 + (step * len(prompts) + i) * g)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    samples = [c for o in outs for c in o.outputs]
    tokens = torch.tensor([c.token_ids for c in samples])
    logprobs = torch.tensor([[lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
                             for c in samples])
    return tokens, logprobs


def train(args: argparse.Namespace) -> list[StepStats]:
    g_prompts = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(2, VOCAB_SIZE, (args.prompts, args.prompt_len),
                            generator=g_prompts)
    # The adapter's directory stays for the run: update_lora reads its adapter_config.json.
    with tempfile.TemporaryDirectory() as tmp:
        path, model = write_policy(Path(tmp), args.seed)
        lora_kw, lora = {}, None
        if args.lora:
            model, adapter = add_lora_adapter(model, Path(tmp))
            lora = LoRARequest("policy", 1, str(adapter))
            lora_kw = dict(enable_lora=True, max_lora_rank=LORA_RANK)
        llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64,
                  max_num_seqs=args.prompts * args.group_size, kv_cache_memory="8MiB",
                  **lora_kw)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=args.lr)
        history = []
        try:
            for step in range(args.steps):
                history.append(one_step(llm, model, optimizer, prompts, args, step, lora))
                print(format_stats(history[-1]), flush=True)
        finally:
            llm.shutdown()
    return history


def push_weights(llm: LLM, model: torch.nn.Module, lora: LoRARequest | None) -> None:
    """The whole state dict, or with LoRA only the adapter's A and B."""
    if lora is None:
        llm.update_weights(model.named_parameters())
        return
    from peft import get_peft_model_state_dict

    llm.update_lora(lora, get_peft_model_state_dict(model))


def one_step(llm: LLM, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             prompts: torch.Tensor, args: argparse.Namespace, step: int,
             lora: LoRARequest | None = None) -> StepStats:
    start = time.perf_counter()
    completions, engine_logprobs = rollout(llm, prompts.tolist(), args, step, lora)
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
    push_weights(llm, model, lora)
    synced = time.perf_counter()
    return StepStats(step, float(rewards.mean()), gap, sampled - start, trained - sampled,
                     synced - trained)


def format_stats(s: StepStats) -> str:
    return (f"step {s.step:3d}  mean reward {s.mean_reward:.3f}  "
            f"max |logprob gap| {s.max_logprob_gap:.1e}  "
            f"(sample {s.sample_s:.2f} s, train {s.train_s:.2f} s, sync {s.sync_s:.3f} s)")


if __name__ == "__main__":
    train(parse_args())
