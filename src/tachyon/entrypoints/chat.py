"""``tachyon chat``: an interactive conversation that streams each reply as it is generated.

Ctrl-C while a reply streams stops that reply and returns to the prompt; Ctrl-C at the
prompt, Ctrl-D or ``/exit`` quits with status 0.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tachyon.config import EngineArgs
from tachyon.sampling_params import SamplingParams

HELP = ("Type a message and press Enter. /reset clears the conversation; Ctrl-C stops a "
        "reply; /exit, Ctrl-D or Ctrl-C at the prompt quits.")
# Ends a reply the token limit cut short, so it does not pass for a finished answer.
CUT_MARKER = " […]"


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" (stopped by Ctrl-C)
    num_tokens: int


def cut_note(reply: Reply, params: SamplingParams) -> str | None:
    """Why a reply ended before the model finished it, in the user's terms; None if it did."""
    if reply.finish_reason == "abort":
        return "(stopped)"
    if reply.finish_reason != "length":
        return None
    if params.max_tokens is not None and reply.num_tokens >= params.max_tokens:
        return f"(cut at --max-tokens {params.max_tokens})"
    return "(cut at --max-model-len)"


@contextmanager
def _sigint_sets(flag: threading.Event) -> Iterator[None]:
    """While inside, Ctrl-C sets ``flag`` instead of raising: the loop stops between two
    engine steps, never inside one, so the engine stays consistent and reusable."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only; Ctrl-C raises as usual
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_reply(engine: Any, request_id: str, prompt: str | list[int],
                 params: SamplingParams, write: Callable[[str], None]) -> Reply:
    """Generate one reply, writing its text to ``write`` as it is produced.

    Ctrl-C (or a KeyboardInterrupt raised by ``write``) aborts the request and returns what
    was written, with finish reason "abort"; the engine can serve the next request.
    """
    engine.add_request(request_id, prompt, params)
    has_text = engine.get_tokenizer() is not None  # token-id prompts run without one
    stop = threading.Event()
    text, tokens, reason = "", 0, None
    # A KeyboardInterrupt is Ctrl-C where no handler could be installed: also a stop.
    with contextlib.suppress(KeyboardInterrupt), _sigint_sets(stop):
        while reason is None and not stop.is_set() and engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                done = out.outputs[0]
                delta = _new_text(engine, out, text) if has_text else ""
                tokens, reason = len(done.token_ids), done.finish_reason
                if delta:
                    text += delta
                    write(delta)
    if reason is None:
        engine.abort_request(request_id)
        reason = "abort"
    return Reply(text, reason, tokens)


def _new_text(engine: Any, out: Any, written: str) -> str:
    """Text of ``out`` not written yet. While running, the engine holds back what may begin a
    stop string; a finished request is gone from the engine and its whole text is final."""
    if out.finished:
        return out.outputs[0].text[len(written):]
    return engine.take_text_delta(out.request_id, 0, False)


def run_chat(args: EngineArgs, params: SamplingParams, system: str | None) -> int:
    from tachyon.engine.llm_engine import LLMEngine
    from tachyon.entrypoints.llm import apply_chat_template

    engine = LLMEngine.from_engine_args(args)
    tok = engine.get_tokenizer()
    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(HELP, file=sys.stderr)
    turns = itertools.count()
    while True:
        line = _read_line()
        if line is None or line in ("/exit", "/quit"):
            return 0
        if not line:
            continue
        if line == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = stream_reply(engine, f"chat-{next(turns)}",
                                 apply_chat_template(tok, messages), params, _write)
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            messages.pop()
            print(f"\ntachyon: error: {e}", file=sys.stderr)
            continue
        _end_reply(reply, params)
        if reply.text:
            messages.append({"role": "assistant", "content": reply.text})
        else:  # stopped before a word: as if the message had not been sent
            messages.pop()


def _read_line() -> str | None:
    """The user's next message, stripped; None to quit (Ctrl-D, or Ctrl-C at the prompt)."""
    try:
        return input("\n>>> " if sys.stdin.isatty() else "").strip()
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def _end_reply(reply: Reply, params: SamplingParams) -> None:
    note = cut_note(reply, params)
    if reply.finish_reason == "length":
        _write(CUT_MARKER)
    _write("\n")
    if note:
        print(note, file=sys.stderr)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
