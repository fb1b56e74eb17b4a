"""``tachyon bench serve``: replay a workload against an OpenAI-compatible server.

Needs only aiohttp and the standard library (it runs where the server's dependencies do not).
Prompts are token-id lists, so dummy-weight models without a tokenizer work. Requests arrive
as a Poisson process at ``--request-rate`` (``inf``: all at once), optionally capped at
``--max-concurrency`` in flight, and stream with usage, one token per chunk. Reported as vLLM's
``benchmark_serving`` does: TTFT (arrival to first token), TPOT ((latency - TTFT) / (tokens - 1)
per request), ITL (every gap between two chunks), output tokens per second of wall time.

Workloads: ``standard`` is the throughput workload of BENCHMARKS.md (256 prompts of 100-1024
random ids, 100-1024 output tokens, temperature 0.6, ignore_eos; ``--num-prompts`` takes its
first N); ``random`` draws lengths around ``--random-input-len`` / ``--random-output-len``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

# The standard workload (BENCHMARKS.md): its size, and the range of its random token ids.
STANDARD_NUM_PROMPTS = 256
STANDARD_LEN_RANGE = (100, 1024)
TOKEN_ID_RANGE = (0, 10000)
STANDARD_TEMPERATURE = 0.6
PERCENTILES = (50, 99)
# aiohttp reads SSE line by line; a chunk with logprobs can exceed its 64 KiB default.
MAX_LINE_BYTES = 1 << 22


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str  # text when a tokenizer was given (vLLM sends text)
    max_tokens: int


@dataclass
class RequestResult:
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def standard_workload(num_prompts: int) -> list[BenchRequest]:
    """BENCHMARKS.md, drawn in the same order (all prompts, then all output lengths)."""
    rng = random.Random(0)
    lo, hi = STANDARD_LEN_RANGE
    prompts = [[rng.randint(*TOKEN_ID_RANGE) for _ in range(rng.randint(lo, hi))]
               for _ in range(STANDARD_NUM_PROMPTS)]
    max_tokens = [rng.randint(lo, hi) for _ in range(STANDARD_NUM_PROMPTS)]
    reqs = [BenchRequest(p, m) for p, m in zip(prompts, max_tokens, strict=True)]
    return reqs[:num_prompts]


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int) -> list[BenchRequest]:
    """Lengths uniform in ``[len * (1 - ratio), len * (1 + ratio)]`` (at least 1)."""
    rng = random.Random(seed)

    def draw(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    return [BenchRequest([rng.randint(*TOKEN_ID_RANGE) for _ in range(draw(input_len))],
                         draw(output_len)) for _ in range(num_prompts)]


def as_text(reqs: list[BenchRequest], tokenizer: Any, seed: int) -> list[BenchRequest]:
    """The same lengths, as text of random non-special tokens of ``tokenizer`` (the server
    tokenizes it back; its usage reports the exact prompt length)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    allowed = [t for t in range(len(tokenizer)) if t not in special]
    return [BenchRequest(tokenizer.decode([rng.choice(allowed) for _ in r.prompt]),
                         r.max_tokens) for r in reqs]


def arrival_gaps(n: int, rate: float, seed: int, burstiness: float = 1.0) -> Iterator[float]:
    """Seconds to wait before each request: gamma-distributed gaps of mean ``1 / rate``
    (burstiness 1: exponential, i.e. Poisson arrivals)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield 0.0 if math.isinf(rate) else rng.gammavariate(burstiness, 1 / (rate * burstiness))


def _payload(req: BenchRequest, model: str, ns: argparse.Namespace) -> dict[str, Any]:
    return {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": ns.temperature, "ignore_eos": ns.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}


async def send_request(session: Any, url: str, payload: dict[str, Any]) -> RequestResult:
    """One streamed completion; times every chunk that carries a choice."""
    prompt = payload["prompt"]
    res = RequestResult(len(prompt) if isinstance(prompt, list) else 0)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                data = json.loads(line[5:])
                now = time.perf_counter()
                if "error" in data:
                    res.error = str(data["error"].get("message"))
                    return res
                if data.get("choices"):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if data.get("usage"):
                    res.output_tokens = int(data["usage"]["completion_tokens"])
                    res.prompt_len = int(data["usage"]["prompt_tokens"])
    except Exception as e:  # a failed request is a result, not a crash of the benchmark
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = last - start
    res.output_tokens = res.output_tokens or chunks
    return res


async def run_workload(ns: argparse.Namespace, reqs: list[BenchRequest]) -> tuple[
        list[RequestResult], float, str]:
    import aiohttp

    url = ns.base_url.rstrip("/") + ns.endpoint
    limit = asyncio.Semaphore(ns.max_concurrency or len(reqs))
    timeout = aiohttp.ClientTimeout(total=ns.timeout)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn,
                                     read_bufsize=MAX_LINE_BYTES) as session:
        model = ns.model or await _first_model(session, ns.base_url)
        if not ns.no_warmup:
            probe = await send_request(session, url, _payload(BenchRequest(reqs[0].prompt, 4),
                                                              model, ns))
            if not probe.ok:
                raise RuntimeError(f"the warm-up request failed: {probe.error}")

        async def one(req: BenchRequest) -> RequestResult:
            async with limit:
                return await send_request(session, url, _payload(req, model, ns))

        tasks = []
        start = time.perf_counter()
        gaps = arrival_gaps(len(reqs), ns.request_rate, ns.seed, ns.burstiness)
        for req, gap in zip(reqs, gaps, strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start, model


async def _first_model(session: Any, base_url: str) -> str:
    async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats_ms(xs: list[float]) -> dict[str, float]:
    mean = sum(xs) / len(xs) if xs else float("nan")
    out = {"mean": 1000 * mean,
           "std": 1000 * math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs
           else float("nan")}
    for q in PERCENTILES:
        out["median" if q == 50 else f"p{q}"] = 1000 * percentile(xs, q)
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl]),
        "e2el_ms": _stats_ms([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def vllm_result(s: dict[str, Any], results: list[RequestResult], ns: argparse.Namespace,
                model: str) -> dict[str, Any]:
    """``vllm bench serve --save-result``'s fields, so its readers read ours."""
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai",
        "backend": ns.backend, "model_id": model, "tokenizer_id": ns.tokenizer or model,
        "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(ns.request_rate) else ns.request_rate,
        "burstiness": ns.burstiness, "max_concurrency": ns.max_concurrency,
        "duration": s["duration_s"], "completed": s["completed"], "failed": s["failed"],
        "total_input_tokens": s["total_input_tokens"],
        "total_output_tokens": s["total_output_tokens"],
        "request_throughput": s["request_throughput"],
        "output_throughput": s["output_throughput"],
        "total_token_throughput": s["total_token_throughput"],
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "errors": [r.error or "" for r in results],
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        st = s[f"{metric}_ms"]
        for stat in ("mean", "median", "std", "p99"):
            out[f"{stat}_{metric}_ms"] = st[stat]
    return out


def format_table(s: dict[str, Any], ns: argparse.Namespace) -> str:
    rate = "inf" if math.isinf(ns.request_rate) else f"{ns.request_rate:g}"
    rows = [
        ("Successful requests", f"{s['completed']}"), ("Failed requests", f"{s['failed']}"),
        ("Request rate (req/s)", rate),
        ("Max concurrency", f"{ns.max_concurrency or '-'}"),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", f"{s['total_input_tokens']}"),
        ("Total output tokens", f"{s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        for stat, v in s[key].items():
            if stat == "std":
                continue
            rows.append((f"{stat.capitalize()} {title} (ms)", f"{v:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    bar = "=" * (width + 12)
    lines = [bar, " Serving Benchmark Result ".center(width + 12, "="), *(
        f"{k:<{width}}{v:>12}" for k, v in rows), bar]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``vllm bench serve`` that this client implements, with vLLM's names and
    defaults for the random dataset, so one command line measures either server."""
    p = argparse.ArgumentParser(prog="tachyon bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["openai", "vllm", "tachyon"], default="openai",
                   help="all three speak OpenAI completions (vLLM's names accepted)")
    p.add_argument("--base-url", default=None, help="default: http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer: random prompts are sent as its text, as vLLM does "
                        "(default: token ids, which need no tokenizer)")
    p.add_argument("--dataset-name", "--dataset", dest="dataset",
                   choices=["standard", "random"], default="standard")
    p.add_argument("--num-prompts", type=int, default=None,
                   help=f"default: {STANDARD_NUM_PROMPTS} (standard), 1000 (random)")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None,
                   help=f"default: {STANDARD_TEMPERATURE} (standard), 0 (random)")
    p.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", default=None,
                   help="default: on for standard, off for random (as vLLM)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="per request, seconds")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--disable-tqdm", action="store_true", help="accepted; there is no bar")
    p.add_argument("--save-result", action="store_true",
                   help="write vLLM's result JSON to --result-dir/--result-filename")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the summary and every request's timings here")
    return p


def _check(ns: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if ns.num_prompts is not None and ns.num_prompts < 1:
        p.error("--num-prompts must be >= 1")
    if not ns.request_rate > 0 or not ns.burstiness > 0:
        p.error("--request-rate and --burstiness must be > 0 (rate inf: all at once)")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    if min(ns.random_input_len, ns.random_output_len) < 1 or not 0 <= ns.random_range_ratio < 1:
        p.error("random lengths must be >= 1 and --random-range-ratio in [0, 1)")
    standard = ns.dataset == "standard"
    ns.base_url = ns.base_url or f"http://{ns.host}:{ns.port}"
    if ns.temperature is None:
        ns.temperature = STANDARD_TEMPERATURE if standard else 0.0
    if ns.ignore_eos is None:
        ns.ignore_eos = standard


def main(args: list[str]) -> int:
    p = build_parser()
    ns = p.parse_args(args)
    _check(ns, p)
    if ns.dataset == "standard":
        reqs = standard_workload(ns.num_prompts or STANDARD_NUM_PROMPTS)
    else:
        reqs = random_workload(ns.num_prompts or 1000, ns.random_input_len,
                               ns.random_output_len, ns.random_range_ratio, ns.seed)
    try:
        if ns.tokenizer:
            from transformers import AutoTokenizer

            reqs = as_text(reqs, AutoTokenizer.from_pretrained(ns.tokenizer), ns.seed)
        results, duration, model = asyncio.run(run_workload(ns, reqs))
    except Exception as e:
        print(f"tachyon bench serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = summarize(results, duration)
    print(format_table(summary, ns))
    if ns.save_result:
        name = ns.result_filename or (
            f"{ns.backend}-{ns.request_rate:g}qps-{os.path.basename(model)}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}.json")
        os.makedirs(ns.result_dir, exist_ok=True)
        with open(os.path.join(ns.result_dir, name), "w") as f:
            json.dump(vllm_result(summary, results, ns, model), f)
    if ns.json:
        config = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                  for k, v in vars(ns).items()}
        with open(ns.json, "w") as f:
            json.dump({"config": config, "summary": summary,
                       "requests": [asdict(r) for r in results]}, f, indent=1)
    if summary["failed"]:
        print(f"tachyon bench serve: error: {summary['failed']} of {len(results)} requests "
              f"failed, e.g. {summary['errors'][0]}", file=sys.stderr)
        return 1
    return 0
