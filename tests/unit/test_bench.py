"""``tachyon bench``: figures on a CPU with a tiny model, or a non-zero exit with one line
that says why (never a JSON holding a traceback, never an empty PNG)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tachyon.bench import latency, throughput
from tachyon.bench.common import bench_engine_args
from tachyon.entrypoints.args import parse_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--device", "cpu", "--max-model-len", "64"]


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def one_error_line(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_latency_on_cpu_writes_numbers(tiny_llama: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "lat.json", tmp_path / "lat.png"
    rc = latency.main(["--model", tiny_llama, *TINY, "--modes", "NONE", "--batch-sizes", "1",
                       "2", "--context", "8", "--steps", "3", "--json", str(out_json),
                       "--plot", str(out_png)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out_json.read_text())
    assert report["timer"] == "wall clock" and report["failed"] == {}
    assert report["load_format"] == "safetensors"
    steps = report["modes"]["NONE"]["steps"]
    assert set(steps) == {"1", "2"}
    for figures in steps.values():
        assert 0 < figures["min_ms"] <= figures["median_ms"] < 60_000
    check_png(out_png)
    assert "NONE" in capsys.readouterr().out  # the table


def test_latency_fails_loudly_when_every_mode_fails(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "lat.json", tmp_path / "lat.png"
    rc = latency.main(["--model", str(tmp_path / "no-such-model"), *TINY, "--modes", "NONE",
                       "--batch-sizes", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err, latency.NAME)
    assert "every mode failed" in line and "unknown model" in line
    assert not out_json.exists() and not out_png.exists()


def test_latency_checks_the_cache_fits_the_batch(tiny_llama: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A child's own failure comes back as its one-line reason (here: the KV cache)."""
    rc = latency.main(["--model", tiny_llama, *TINY, "--modes", "NONE", "--batch-sizes", "4",
                       "--context", "40", "--steps", "3", "--num-gpu-blocks-override", "8",
                       "--json", str(tmp_path / "lat.json"), "--no-plot"])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err, latency.NAME)
    # 4 requests x (40 prompt + 3 timed + 3 warm-up + 8 spare tokens) in blocks of 16
    assert "batch 4 x 54 tokens needs 16 KV blocks, the cache holds 8" in line


def test_throughput_runs_the_real_weights_of_a_model_path(
        tiny_llama: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "tp.json", tmp_path / "tp.png"
    rc = throughput.main(["--model", tiny_llama, *TINY, "--num-prompts", "3", "--input-len",
                          "4", "8", "--output-len", "2", "4", "--json", str(out_json),
                          "--plot", str(out_png)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out_json.read_text())
    assert result["load_format"] == "safetensors"
    assert 6 <= result["output_tokens"] <= 12 and result["tok_per_s"] > 0
    check_png(out_png)


@pytest.mark.parametrize("model, expected", [("qwen3-0.6b", "dummy"), ("/a/model/dir", "auto")])
def test_bench_weights_default(model: str, expected: str) -> None:
    """Presets have no weights, so auto means dummy for them; a path keeps auto, which
    resolves to its real weights (the test above)."""
    ns = parse_args(throughput.build_parser(), ["--model", model])
    assert bench_engine_args(ns).load_format == expected
    assert throughput.build_parser().get_default("model") == "qwen3-0.6b"


def test_throughput_help_says_which_weights() -> None:
    text = " ".join(throughput.build_parser().format_help().split())
    assert "random (dummy) weights for a preset and the real weights of a model path" in text


def test_bad_value_exits_2_in_one_line(tiny_llama: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = throughput.main(["--model", tiny_llama, *TINY, "--block-size", "12",
                          "--json", str(tmp_path / "tp.json"), "--no-plot"])
    assert rc == 2
    assert "block_size must be a power of two" in one_error_line(capsys.readouterr().err,
                                                                 throughput.NAME)
    assert not (tmp_path / "tp.json").exists()


def test_missing_matplotlib_fails_before_measuring(tiny_llama: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc = throughput.main(["--model", tiny_llama, *TINY, "--json", str(tmp_path / "tp.json"),
                          "--plot", str(tmp_path / "tp.png")])
    assert rc == 1
    assert "--no-plot" in one_error_line(capsys.readouterr().err, throughput.NAME)
    assert not (tmp_path / "tp.json").exists()
