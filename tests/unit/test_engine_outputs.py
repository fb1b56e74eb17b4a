"""What a request hands back: stop strings, stop token ids, min_tokens, ignore_eos, n > 1,
seeded sampling, logprobs, and text that is built incrementally yet equals the tokenizer's
own decode. The real SmolLM2 tokenizer is used throughout; generation runs on a tiny random
model with that vocabulary, or on the embedded SmolLM2 where real behaviour matters (EOS)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tachyon import LLM, SamplingParams
from tachyon.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The history of the city begins with"


@pytest.fixture(scope="module")
def tok_llm(tiny_tok_model: str) -> LLM:
    return LLM(model=tiny_tok_model, device="cpu", max_model_len=256, block_size=4)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def one(llm: LLM, prompt: Any, params: SamplingParams) -> Any:
    return llm.generate([prompt], params, use_tqdm=False)[0]


# --------------------------------------------------------------------------- stop strings


def test_stop_string_is_cut_out_of_the_text(tok_llm: LLM, rng: random.Random) -> None:
    full = one(tok_llm, PROMPT, greedy(40, ignore_eos=True)).outputs[0]
    text = full.text
    assert REPLACEMENT_CHAR not in text and len(text) > 20
    # A stop string from the middle of the text, often spanning two tokens.
    start = rng.randrange(5, len(text) - 6)
    stop = text[start:start + rng.randint(2, 5)]
    first = text.find(stop)
    out = one(tok_llm, PROMPT, greedy(40, ignore_eos=True, stop=["\x00never", stop])).outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    kept = one(tok_llm, PROMPT, greedy(40, ignore_eos=True, stop=stop,
                                       include_stop_str_in_output=True)).outputs[0]
    assert kept.text == text[:first + len(stop)]


def test_streamed_text_never_shows_a_partial_stop_string(tok_llm: LLM,
                                                         rng: random.Random) -> None:
    full = one(tok_llm, PROMPT, greedy(40, ignore_eos=True)).outputs[0]
    text, tok = full.text, tok_llm.get_tokenizer()
    # A stop string straddling a token boundary: its head arrives one token before its tail.
    boundaries = [len(head) for k in range(4, len(full.token_ids) - 4)
                  for head in [tok.decode(full.token_ids[:k])]
                  if text.startswith(head) and REPLACEMENT_CHAR not in head]
    cut = rng.choice([b for b in boundaries if text.find(text[b - 3:b + 3]) == b - 3])
    stop = text[cut - 3:cut + 3]
    engine = tok_llm.engine
    rid = engine.add_request(None, PROMPT, greedy(40, ignore_eos=True, stop=stop))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out.outputs[0].text
                streamed += final[len(streamed):]
            else:
                streamed += engine.take_text_delta(rid, 0, False)
            # Never anything that is not in the final text (no head of the stop string).
            assert text[:text.find(stop)].startswith(streamed), streamed
    assert streamed == final == text[:text.find(stop)]


# --------------------------------------------------------------------------- token stops


def test_stop_token_id(tok_llm: LLM) -> None:
    full = one(tok_llm, PROMPT, greedy(24, ignore_eos=True)).outputs[0]
    stop_tok = full.token_ids[6]
    cut = full.token_ids.index(stop_tok)
    out = one(tok_llm, PROMPT, greedy(24, ignore_eos=True, stop_token_ids=[stop_tok])).outputs[0]
    assert out.token_ids == full.token_ids[:cut + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # As in vLLM, the stop token's text is not part of the output text.
    tok = tok_llm.get_tokenizer()
    assert out.text == tok.decode(full.token_ids[:cut], skip_special_tokens=True)


def test_min_tokens_forbids_stop_tokens_until_reached(tok_llm: LLM) -> None:
    """Against a reference built one token at a time: for the first ``min_tokens`` outputs
    greedy takes the best token that is not the stop token (the runner-up from the top-2
    logprobs when the best is it); from there on, plain greedy with the stop token."""
    full = one(tok_llm, PROMPT, greedy(24, ignore_eos=True)).outputs[0]
    stop_tok = full.token_ids[2]
    min_tokens = 8
    params = greedy(24, ignore_eos=True, stop_token_ids=[stop_tok], min_tokens=min_tokens)
    out = one(tok_llm, PROMPT, params).outputs[0]

    ids = list(tok_llm.get_tokenizer()(PROMPT)["input_ids"])
    assert one(tok_llm, {"prompt_token_ids": ids}, greedy(1)).outputs[0].token_ids == \
        full.token_ids[:1], "the token-id prompt is not the text prompt"
    forced = []
    for _ in range(min_tokens):
        top = one(tok_llm, {"prompt_token_ids": ids + forced},
                  greedy(1, ignore_eos=True, logprobs=2)).outputs[0].logprobs[0]
        best, runner_up = sorted(top, key=top.get, reverse=True)[:2]
        forced.append(runner_up if best == stop_tok else best)
    rest = one(tok_llm, {"prompt_token_ids": ids + forced},
               greedy(24 - min_tokens, ignore_eos=True, stop_token_ids=[stop_tok])).outputs[0]
    assert forced[2] != stop_tok  # the mask had something to do
    assert out.token_ids == forced + rest.token_ids
    assert (out.finish_reason, out.stop_reason) == (rest.finish_reason, rest.stop_reason)

    # A second stop token, the one greedy takes right at min_tokens: masked before (it was
    # never the best there, so the path is the same), honoured from there on.
    at_min = rest.token_ids[0]
    assert at_min not in forced
    params = greedy(24, ignore_eos=True, stop_token_ids=[stop_tok, at_min], min_tokens=min_tokens)
    out = one(tok_llm, PROMPT, params).outputs[0]
    assert out.token_ids == [*forced, at_min]
    assert (out.finish_reason, out.stop_reason) == ("stop", at_min)


def test_eos_min_tokens_and_ignore_eos_on_the_real_model(default_llm: LLM) -> None:
    # transformers reads the GGUF tokenizer's EOS as <|im_start|>; the config says <|im_end|>.
    eos = default_llm.engine.eos_token_ids
    ref = default_llm.chat(CHAT, greedy(32))[0].outputs[0]
    assert ref.token_ids[-1] in eos and ref.finish_reason == "stop" and ref.stop_reason is None
    assert "Paris" in ref.text and "<|im_end|>" not in ref.text
    n = len(ref.token_ids)

    ignoring = default_llm.chat(CHAT, greedy(n + 4, ignore_eos=True))[0].outputs[0]
    assert ignoring.token_ids[:n] == ref.token_ids
    assert len(ignoring.token_ids) == n + 4 and ignoring.finish_reason == "length"

    longer = default_llm.chat(CHAT, greedy(n + 4, min_tokens=n + 4))[0].outputs[0]
    assert longer.token_ids[:n - 1] == ref.token_ids[:-1]
    assert eos.isdisjoint(longer.token_ids)
    assert len(longer.token_ids) == n + 4 and longer.finish_reason == "length"


# --------------------------------------------------------------------------- sampling


def test_n_samples(tok_llm: LLM) -> None:
    out = one(tok_llm, PROMPT, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12,
                                              ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) == 3 and all(len(s) == 12 for s in seqs)
    again = one(tok_llm, PROMPT, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12,
                                                ignore_eos=True))
    assert [tuple(c.token_ids) for c in again.outputs] == seqs
    greedy_n = one(tok_llm, PROMPT, greedy(8, n=2, ignore_eos=True))
    assert greedy_n.outputs[0].token_ids == greedy_n.outputs[1].token_ids


def test_seeded_sampling_is_reproducible_across_engines(tiny_tok_model: str,
                                                       tok_llm: LLM) -> None:
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_tokens=16,
                             ignore_eos=True) for s in (1, 2, 1)]
    a = [o.outputs[0].token_ids for o in tok_llm.generate([PROMPT] * 3, params, use_tqdm=False)]
    other = LLM(model=tiny_tok_model, device="cpu", max_model_len=256, block_size=16)
    b = [o.outputs[0].token_ids for o in other.generate([PROMPT] * 3, params, use_tqdm=False)]
    assert a == b
    assert a[0] == a[2] and a[0] != a[1]


def test_logprobs_match_hf(tiny_llama: str, rng: random.Random) -> None:
    """Logprobs of the sampled token and the top 5 equal HF's log-softmax (float64) of the
    same sequence, and the cumulative logprob is their sum."""
    from transformers import AutoModelForCausalLM

    prompt = [rng.randrange(500) for _ in range(rng.randint(3, 30))]
    llm = LLM(model=tiny_llama, device="cpu", max_model_len=128)
    params = SamplingParams(temperature=1.0, seed=rng.randrange(1000), logprobs=5,
                            max_tokens=10, ignore_eos=True)
    out = one(llm, prompt, params).outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + out.token_ids[:-1]])).logits[0]
    ref = logits[len(prompt) - 1:].log_softmax(-1)
    assert len(out.logprobs) == len(out.token_ids)
    for step, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        top5 = ref[step].topk(5).indices.tolist()
        assert set(top5) | {tok} == set(lps), f"step {step}"
        for t, v in lps.items():
            assert v == pytest.approx(float(ref[step, t]), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(
        sum(lps[t] for t, lps in zip(out.token_ids, out.logprobs, strict=True)), abs=1e-5)


# --------------------------------------------------------------------------- detokenization

PIECES = ["日本語", "😀", "é", "👩‍👩‍👧", "Ω", "한국어", "🇫🇷", " ", " the", "naïve", "中文",
          "\n", "ß", "—", "🤖", "x", "!"]


def detokenize_one_by_one(tokenizer: Any, ids: list[int], prompt: list[int],
                          params: SamplingParams) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    chunks = []
    for t in ids:
        before = len(detok.text)
        stopped = detok.add_token(t)
        chunks.append(detok.text[before:])
        if stopped:  # the engine adds nothing after a stop string
            return chunks, detok
    before = len(detok.text)
    detok.flush()
    chunks.append(detok.text[before:])
    return chunks, detok


def test_incremental_detokenization_never_splits_a_character(smol_tokenizer: Any,
                                                            rng: random.Random) -> None:
    for _ in range(20):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30)))
        ids = smol_tokenizer.encode(text)
        prompt = smol_tokenizer.encode(rng.choice(["", "Say:", "你好，"]))
        chunks, _ = detokenize_one_by_one(smol_tokenizer, ids, prompt, SamplingParams())
        assert "".join(chunks) == smol_tokenizer.decode(ids) == text
        assert all(REPLACEMENT_CHAR not in c for c in chunks), chunks


def test_multibyte_characters_are_held_back_until_complete(smol_tokenizer: Any) -> None:
    ids = smol_tokenizer.encode("😀")
    assert len(ids) > 1, "the emoji should span several byte tokens"
    chunks, _ = detokenize_one_by_one(smol_tokenizer, ids, [], SamplingParams())
    assert chunks[:len(ids) - 1] == [""] * (len(ids) - 1) and chunks[len(ids) - 1] == "😀"


def test_stop_string_made_of_multibyte_characters(smol_tokenizer: Any) -> None:
    text = "日本語のテキスト😀と中文"
    ids = smol_tokenizer.encode(text)
    _, detok = detokenize_one_by_one(smol_tokenizer, ids, [], SamplingParams(stop="😀と"))
    assert detok.text == "日本語のテキスト" and detok.stop_reason == "😀と"


def test_engine_text_equals_tokenizer_decode(default_llm: LLM) -> None:
    out = default_llm.chat([{"role": "user", "content": "Write two short sentences in "
                             "Japanese and one emoji."}], greedy(24))[0].outputs[0]
    tok = default_llm.get_tokenizer()
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert any(ord(c) > 0x2000 for c in out.text), "the reply should hold multi-byte text"


def test_max_tokens_none_runs_to_max_model_len(tiny_llama: str) -> None:
    llm = LLM(model=tiny_llama, device="cpu", max_model_len=32, block_size=4)
    out = one(llm, list(range(3, 23)), SamplingParams(temperature=0.0, max_tokens=None,
                                                      ignore_eos=True)).outputs[0]
    assert len(out.token_ids) == 32 - 20 and out.finish_reason == "length"
    assert llm.engine.num_free_blocks() == llm.engine.kv.pool.num_blocks


def test_params_changed_after_a_call_take_effect_in_the_next(tiny_llama: str) -> None:
    """A caller's SamplingParams changed between calls: the next call samples with the new
    values (the runner caches each row's params; it must never hold the caller's object),
    exactly as a fresh object with those values does."""
    llm = LLM(model=tiny_llama, device="cpu", max_model_len=128)
    prompt = [5, 17, 3, 9, 40, 2]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    greedy = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    sp.temperature, sp.seed = 1.5, 1234
    changed = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    fresh = llm.generate([prompt], SamplingParams(temperature=1.5, seed=1234, max_tokens=12,
                                                  ignore_eos=True), use_tqdm=False)
    assert changed == fresh[0].outputs[0].token_ids
    assert changed != greedy  # seed 1234 at temperature 1.5 leaves the argmax path
