"""The command line: flags generated from ``EngineArgs``, help text, unknown options, a CLI
that starts without torch, and ``tachyon chat``'s streaming and Ctrl-C handling."""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tachyon.bench import latency, throughput
from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine
from tachyon.entrypoints import chat
from tachyon.entrypoints.args import (
    Parser,
    add_engine_args,
    add_sampling_args,
    engine_args_from,
    flag_name,
    parse_args,
    sampling_params_from,
)
from tachyon.entrypoints.cli import build_parser, main
from tachyon.sampling_params import SamplingParams


def engine_parser(**kwargs: Any) -> argparse.ArgumentParser:
    p = Parser(prog="test")
    add_engine_args(p, **kwargs)
    return p


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert engine_args_from(parse_args(engine_parser(), [])) == EngineArgs()


def test_every_field_has_a_flag() -> None:
    options = {s for a in engine_parser()._actions for s in a.option_strings}
    missing = [f.name for f in dataclasses.fields(EngineArgs) if flag_name(f.name) not in options]
    assert missing == []


def test_flags_reach_engine_args() -> None:
    argv = ["--model", "m.gguf", "--max-model-len", "77", "--gpu-memory-utilization", "0.5",
            "--kv-cache-memory", "2GiB", "-tp", "2", "--enforce-eager",
            "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--async-scheduling",
            "--cudagraph-mode", "FULL", "-O", '{"compile_sizes": [4]}', "--device", "cpu",
            "--attention-backend", "flex", "--seed", "9", "--skip-tokenizer-init"]
    args = engine_args_from(parse_args(engine_parser(), argv))
    assert args == EngineArgs(
        model="m.gguf", max_model_len=77, gpu_memory_utilization=0.5, kv_cache_memory="2GiB",
        tensor_parallel_size=2, enforce_eager=True, enable_prefix_caching=False,
        enable_chunked_prefill=False, async_scheduling=True, cudagraph_mode="FULL",
        compilation_config='{"compile_sizes": [4]}', device="cpu", attention_backend="flex",
        seed=9, skip_tokenizer_init=True)


def test_tri_state_flag_turns_off() -> None:
    ns = parse_args(engine_parser(), ["--no-async-scheduling"])
    assert engine_args_from(ns).async_scheduling is False


def test_overridden_default_shows_in_help_and_applies() -> None:
    p = engine_parser(defaults={"max_num_seqs": 1}, notes={"seed": "a note"})
    assert engine_args_from(parse_args(p, [])).max_num_seqs == 1
    text = " ".join(p.format_help().split())
    assert "most requests running in one step (default: 1)" in text
    assert "bring no seed of their own; a note (default: 0)" in text


def _visible_actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from ((f"{name} {n}", x) for n, x in _visible_actions(sub))
        elif a.option_strings and a.help != argparse.SUPPRESS and not isinstance(
                a, argparse._HelpAction):
            yield a.option_strings[0], a


@pytest.mark.parametrize("parser", [build_parser, latency.build_parser,
                                    throughput.build_parser], ids=["tachyon", "latency",
                                                                   "throughput"])
def test_every_flag_has_help_with_its_default(parser: Any) -> None:
    undocumented = [name for name, a in _visible_actions(parser())
                    if not a.help or "default" not in a.help]
    assert undocumented == []


def test_sampling_flags_and_the_old_seed_spelling() -> None:
    p = Parser(prog="test")
    add_sampling_args(p)
    assert sampling_params_from(parse_args(p, ["--sampling-seed", "5"])).seed == 5
    params = sampling_params_from(parse_args(p, ["--request-seed", "6", "--max-tokens", "3",
                                                 "--stop", "a", "--stop", "b"]))
    assert (params.seed, params.max_tokens, params.stop_strings) == (6, 3, ["a", "b"])


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "tachyon: error: unknown option --bogus; see tachyon --help"),
    (["generate", "hi", "--max-tokn", "3"],
     "tachyon: error: unknown option --max-tokn; did you mean --max-tokens?"),
    (["generate", "hi", "there"], "tachyon: error: unexpected argument 'there'"),
    ([], "tachyon: error: a command is required"),
])
def test_bad_command_lines(argv: list[str], message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_cli_and_config_import_without_torch() -> None:
    """``--help`` stays fast: nothing on its path imports torch (checked in a fresh
    interpreter, since this one has torch loaded)."""
    code = ("import sys, tachyon, tachyon.config, tachyon.entrypoints.cli as c, "
            "tachyon.bench.latency, tachyon.bench.throughput; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_lazy_package_exports() -> None:
    import tachyon

    assert tachyon.SamplingParams is SamplingParams
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = tachyon.Nope


# -- tachyon chat ----------------------------------------------------------------------
MAX_TOKENS = 12
PROMPT = [5, 17, 33, 101, 7, 250]


@pytest.fixture(scope="module")
def engine(tiny_llama: str) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=tiny_llama, device="cpu",
                                                 max_model_len=64, block_size=4))


def params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def interrupt_after(engine: LLMEngine, steps: int, raise_it: bool,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``steps`` engine steps, Ctrl-C: a real SIGINT, or a KeyboardInterrupt raised
    out of the step (what a Ctrl-C does where no handler is installed)."""
    real_step, calls = engine.step, []

    def step() -> list[Any]:
        out = real_step()
        calls.append(1)
        if len(calls) == steps:
            if raise_it:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(engine, "step", step)


@pytest.mark.parametrize("raise_it", [False, True], ids=["sigint", "keyboard-interrupt"])
def test_ctrl_c_stops_the_reply_and_the_engine_serves_the_next(
        engine: LLMEngine, raise_it: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    total_blocks, handler = engine.num_free_blocks(), signal.getsignal(signal.SIGINT)
    interrupt_after(engine, 3, raise_it, monkeypatch)
    reply = chat.stream_reply(engine, "stopped", PROMPT, params(), lambda s: None)
    assert reply.finish_reason == "abort"
    # A handled SIGINT stops after the step's tokens are taken; a raised one loses them.
    assert reply.num_tokens == (2 if raise_it else 3)
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == total_blocks
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C raises again at the prompt
    monkeypatch.undo()
    after = chat.stream_reply(engine, "next", PROMPT, params(), lambda s: None)
    assert (after.finish_reason, after.num_tokens) == ("length", MAX_TOKENS)


def test_cut_notes() -> None:
    p = params()
    assert chat.cut_note(chat.Reply("x", "length", MAX_TOKENS), p) == \
        f"(cut at --max-tokens {MAX_TOKENS})"
    assert chat.cut_note(chat.Reply("x", "length", 3), p) == "(cut at --max-model-len)"
    assert chat.cut_note(chat.Reply("x", "abort", 3), p) == "(stopped)"
    assert chat.cut_note(chat.Reply("x", "stop", 3), p) is None


@pytest.mark.parametrize("leave", [EOFError, KeyboardInterrupt], ids=["ctrl-d", "ctrl-c"])
def test_chat_quits_cleanly_and_marks_a_cut_reply(
        tiny_tok_model: str, leave: type[BaseException], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    lines = iter(["Hello"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise leave from None

    monkeypatch.setattr(builtins, "input", fake_input)
    args = EngineArgs(model=tiny_tok_model, device="cpu", max_model_len=128, max_num_seqs=1)
    rc = chat.run_chat(args, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       None)
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.rstrip("\n").endswith(chat.CUT_MARKER)
    assert "(cut at --max-tokens 4)" in out.err
