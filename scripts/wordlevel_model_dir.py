"""A model directory for serving benchmarks without a download: a preset's config.json and a
word-level stand-in tokenizer (token i is the word ``w<i>``, plus Qwen's special tokens), the
same layout as the peer bundle's ``build_model_dir`` so vLLM and tachyon see the same model.

    python scripts/wordlevel_model_dir.py qwen3-0.6b /tmp/qwen3-0.6b-wordlevel
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Qwen's special tokens at their ids, and the unknown token in the last slot.
SPECIAL = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
           151935: "<unk>"}


def build(preset: str, out: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "src/tachyon/loader/presets" / f"{preset}.json"
    cfg = json.loads(src.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if (out / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {SPECIAL.get(i, f"w{i}"): i for i in range(int(cfg["vocab_size"]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|endoftext|>",
                            eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            model_max_length=int(cfg["max_position_embeddings"])
                            ).save_pretrained(out)


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
