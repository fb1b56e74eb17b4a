"""The API process's output side without a model: step messages in, merged choice deltas and
per-prompt metrics out. Expected values are written out by hand."""

from __future__ import annotations

import asyncio

import pytest

from tachyon.engine.messages import CoreStats, Finished, StepOutputs
from tachyon.engine.output_processor import IterationStats, OutputProcessor, RequestCollector
from tachyon.sampling_params import SamplingParams


def _step(ids: list[str], tokens: list[int], finished: list[Finished] | None = None,
          logprobs: list | None = None) -> StepOutputs:
    return StepOutputs(ids, tokens, finished or [], logprobs or [], {}, CoreStats())


def _processor() -> tuple[OutputProcessor, list[IterationStats]]:
    proc = OutputProcessor(tokenizer=None)
    seen: list[IterationStats] = []
    proc.listeners.append(seen.append)
    return proc, seen


def test_slow_consumer_gets_tokens_merged_per_choice() -> None:
    async def run() -> None:
        proc, seen = _processor()
        c = RequestCollector(num_choices=2)
        proc.add(c, [1, 2], SamplingParams(n=2, logprobs=0), [("a", 0), ("b", 1)], 0.0)
        proc.process(_step(["a", "b"], [5, 6], logprobs=[[(5, -0.5)], [(6, -0.25)]]))
        proc.process(_step(["a"], [7], [Finished(0, "length", None)], [[(7, -1.0)]]))
        deltas = {d.index: d for d in await c.get()}
        assert deltas[0].token_ids == [5, 7] and deltas[0].finish_reason == "length"
        assert deltas[0].logprobs == [{5: -0.5}, {7: -1.0}]
        assert deltas[1].token_ids == [6] and deltas[1].finish_reason is None
        assert not c.done
        proc.process(_step(["b"], [8], [Finished(0, "stop", 8)]))
        (last,) = await c.get()
        assert (last.index, last.token_ids, last.finish_reason) == (1, [8], "stop")
        assert c.done and len(proc) == 0
        # One prompt of two samples: TTFT and ITL per sample, e2e and reason once.
        assert sum(len(s.time_to_first_token) for s in seen) == 2
        assert sum(len(s.inter_token_latency) for s in seen) == 2
        assert sum(len(s.e2e_latency) for s in seen) == 1
        assert [r for s in seen for r in s.finish_reasons] == ["stop"]

    asyncio.run(run())


def test_error_comes_after_what_came_before_it() -> None:
    async def run() -> None:
        proc, _ = _processor()
        c = RequestCollector(num_choices=1)
        proc.add(c, [1], SamplingParams(), [("a", 0)], 0.0)
        proc.process(_step(["a"], [3]))
        proc.fail_all(RuntimeError("core died"))
        (d,) = await asyncio.wait_for(c.get(), 5)
        assert d.token_ids == [3]
        with pytest.raises(RuntimeError, match="core died"):
            await asyncio.wait_for(c.get(), 5)

    asyncio.run(run())


def test_removed_samples_count_one_abort_per_prompt_and_ignore_late_tokens() -> None:
    async def run() -> None:
        proc, seen = _processor()
        c = RequestCollector(num_choices=3)
        proc.add(c, [1], SamplingParams(n=3), [("a", 0), ("b", 1), ("c", 2)], 0.0)
        assert proc.remove(["a", "b", "c", "zzz"]) == ["a", "b", "c"]
        assert proc.process(_step(["a"], [9])) == []  # the step that ran meanwhile
        assert [r for s in seen for r in s.finish_reasons] == ["abort"]
        assert not any(s.e2e_latency for s in seen)

    asyncio.run(run())
