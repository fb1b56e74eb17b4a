"""The GRPO example (examples/grpo_rollouts.py) learns: its mean reward rises over a few
steps, and tachyon's logprobs of the sampled tokens stay the trainer's after every weight
push (stale engine weights would be off by far more than float noise from step 1 on)."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "grpo_rollouts.py"
STEPS = 8
# Seeds 0-3 rise by 0.55-0.69 from the first two steps to the last two with these settings;
# an update that never reached the engine leaves the reward where it started (~1/32).
MIN_RISE = 0.25
# float32 engine and float32 trainer on the same weights: observed <= 2e-6.
MAX_LOGPROB_GAP = 1e-4


def test_grpo_example_reward_rises() -> None:
    example = runpy.run_path(str(EXAMPLE))
    args = example["parse_args"]([f"--steps={STEPS}", "--prompts=2", "--lr=1e-2", "--seed=0"])
    history = example["train"](args)
    rewards = [s.mean_reward for s in history]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last - first > MIN_RISE, f"rewards per step: {rewards}"
    gaps = [s.max_logprob_gap for s in history]
    assert max(gaps) < MAX_LOGPROB_GAP, f"logprob gaps per step: {gaps}"


# --lora, seed 0, lr 1e-2: 0.047 -> 0.133 over 8 steps (the base model cannot change, and the
# target token's logit moves only through the adapted projections). The logprob gap is the
# sharper check: an adapter push that never reached its slot leaves the engine sampling from
# the previous adapter, off the trainer by far more than float noise from step 1 on.
LORA_STEPS = 8
LORA_MIN_RISE = 0.04


def test_grpo_example_lora_reward_rises() -> None:
    example = runpy.run_path(str(EXAMPLE))
    args = example["parse_args"]([f"--steps={LORA_STEPS}", "--prompts=2", "--lr=1e-2",
                                  "--seed=0", "--lora"])
    history = example["train"](args)
    rewards = [s.mean_reward for s in history]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last - first > LORA_MIN_RISE, f"rewards per step: {rewards}"
    gaps = [s.max_logprob_gap for s in history]
    assert max(gaps) < MAX_LOGPROB_GAP, f"logprob gaps per step: {gaps}"
