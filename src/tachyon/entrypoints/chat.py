"""``tachyon chat``: an interactive conversation that streams each reply as it is generated."""

from __future__ import annotations

import sys
from typing import Any

from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine
from tachyon.entrypoints.llm import apply_chat_template
from tachyon.sampling_params import SamplingParams

HELP = "Type a message and press Enter. /reset clears the conversation, /exit (or Ctrl-D) quits."


def stream_reply(engine: LLMEngine, request_id: str, prompt: list[int],
                 params: SamplingParams, write: Any) -> str:
    """Generate one reply, writing text to ``write`` as it is produced; returns the text."""
    engine.add_request(request_id, prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            delta = engine.take_text_delta(request_id, 0, out.finished) if not out.finished \
                else out.outputs[0].text[len(text):]
            if delta:
                write(delta)
                text += delta
    return text


def run_chat(args: EngineArgs, params: SamplingParams, system: str | None) -> int:
    engine = LLMEngine.from_engine_args(args)
    tok = engine.get_tokenizer()
    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(HELP, file=sys.stderr)
    turn = 0

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    while True:
        try:
            line = input("\n>>> " if sys.stdin.isatty() else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        prompt = apply_chat_template(tok, messages)
        try:
            reply = stream_reply(engine, f"chat-{turn}", prompt, params, write)
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            messages.pop()
            print(f"\ntachyon: error: {e}", file=sys.stderr)
            continue
        write("\n")
        turn += 1
        messages.append({"role": "assistant", "content": reply})
