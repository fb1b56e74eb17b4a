"""Skinny decode GEMM against cuBLAS at the decode shapes of qwen3-0.6b, llama-3.2-1b and
qwen3-8b; picks the config table of ``tachyon.layers.kernels.skinny_gemm``.

    OUT=./out python scripts/gpu_gemm_bench.py            # ~2-3 min on an H200
    OUT=./out python scripts/gpu_gemm_bench.py --quick    # a few candidates (smoke run)

Compiles run in a thread pool first (``--compile-workers``; 0 compiles lazily, one by one).

For every layer shape and M in {1, 2, 4, 8, 16} it times ``F.linear`` (cuBLAS) and the
kernel under every candidate config. Timing: R calls, cycling over enough weight copies that
none is still in L2 when its turn comes back, captured in one CUDA graph (as the engine runs
decode) and replayed; per-call time = median replay time / R. Each config's output after the
replays is checked against an fp32 reference (and so is cuBLAS's).

Writes to $OUT (default ./out):
  gemm_bench.json          every measurement, the chosen table, per-model step totals
  skinny_gemm_table.py     drop-in replacement for src/tachyon/layers/kernels/skinny_gemm_table.py
and prints a table per shape, then the table entries.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.nn.functional as F
import triton
import triton.testing

from tachyon.layers.kernels import skinny_gemm_table
from tachyon.layers.kernels.skinny_gemm import (
    Prologue,
    SkinnyConfig,
    SkinnyPath,
    compile_skinny_gemm,
    default_config,
    shape_class,
    skinny_gemm,
    skinny_gemm_rms_norm,
)

# H200 device-to-device copy bandwidth (the issue's floor); the measured figure is reported too.
NOMINAL_COPY_GBPS = 4260.0
M_VALUES = (1, 2, 4, 8, 16)
# Weight copies cover at least this many L2 sizes, so each call reads its weight from HBM as
# in a real decode step (1.2 GB of weights for the smallest model, 50 MB of L2).
L2_FLUSH_FACTOR = 3
# Weight bytes streamed per graph replay: >= ~120 us at full bandwidth, far above the event
# timer's resolution; calls per graph capped to keep capture time down on small shapes.
REPLAY_BYTES = 512 << 20
MAX_CALLS_PER_GRAPH = 256
TIMED_REPLAYS = 7
# bf16 outputs against an fp32 reference: max |error| / max |reference|. One bf16 rounding is
# 2**-9 relative; a wrong tile or a missed slice is off by O(1).
MAX_REL_ERROR = 1e-2
# A table entry keeps cuBLAS unless the kernel is at least this much faster (noise margin).
CUBLAS_MARGIN = 0.02
DTYPE = torch.bfloat16
# Extra seconds past --budget-s the prologue comparison may still start shapes in.
PROLOGUE_BUDGET_S = 20

# name -> (hidden, intermediate, heads, kv heads, head_dim, vocab, layers)
MODELS = {
    "qwen3-0.6b": (1024, 3072, 16, 8, 128, 151936, 28),
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 128256, 16),
    "qwen3-8b": (4096, 12288, 32, 8, 128, 151936, 36),
}

# Candidate tiles (block_n, block_k, num_warps, num_stages). FMA: 16-64 bf16 per thread per
# tile (2-8 16-byte loads in flight) from register-only programs (Triton does not pipeline
# loads that feed no dot, so num_stages is moot); block_k = 256 x num_warps lets x load
# straight into the layout of W's columns (narrower tiles convert x through shared memory;
# two such are kept for comparison). DOT / DOT_SWAP: 2-4 stages of 16-64 KB in shared memory.
FMA_TILES = [(2, 1024, 4, 1), (4, 512, 2, 1), (4, 1024, 4, 1), (8, 512, 2, 1),
             (8, 1024, 4, 1), (16, 256, 4, 1), (16, 512, 8, 1)]
DOT_TILES = [(32, 256, 4, 3), (32, 512, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3),
             (128, 128, 8, 3)]
SWAP_TILES = [(64, 128, 4, 4), (64, 256, 4, 3), (64, 512, 4, 2), (128, 128, 4, 3),
              (128, 256, 8, 2)]
QUICK_TILES = {SkinnyPath.FMA: FMA_TILES[3:5], SkinnyPath.DOT: DOT_TILES[2:3],
               SkinnyPath.DOT_SWAP: SWAP_TILES[:1]}
SPLITS = (1, 2, 4, 8, 16)
# FMA is left out above this many rows: 16 FMAs per weight element need the fp32 peak.
FMA_MAX_M = 8
# Split only grids smaller than this many programs per SM; never exceed the second.
SPLIT_BELOW_PROGRAMS_PER_SM = 8
MAX_PROGRAMS_PER_SM = 32


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    hidden, inter, heads, kv_heads, head_dim, vocab, _ = MODELS[model]
    return [
        ("qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden),
        ("o_proj", hidden, heads * head_dim),
        ("gate_up_proj", 2 * inter, hidden),
        ("down_proj", hidden, inter),
        ("lm_head", vocab, hidden),
    ]


def candidates(m: int, n: int, k: int, num_sms: int, quick: bool) -> list[SkinnyConfig]:
    paths = [SkinnyPath.DOT, SkinnyPath.DOT_SWAP]
    if m <= FMA_MAX_M:
        paths.insert(0, SkinnyPath.FMA)
    tiles = {SkinnyPath.FMA: FMA_TILES, SkinnyPath.DOT: DOT_TILES, SkinnyPath.DOT_SWAP: SWAP_TILES}
    out: list[SkinnyConfig] = []
    for path in paths:
        for block_n, block_k, warps, stages in (QUICK_TILES if quick else tiles)[path]:
            programs = triton.cdiv(n, block_n)
            seen: set[int] = set()
            for split in SPLITS:
                cfg = SkinnyConfig(path, block_n, block_k, split, warps, stages)
                splits = cfg.num_splits(k)
                if splits in seen:
                    continue
                if splits > 1 and (programs >= SPLIT_BELOW_PROGRAMS_PER_SM * num_sms
                                   or programs * splits > MAX_PROGRAMS_PER_SM * num_sms):
                    continue
                seen.add(splits)
                out.append(cfg)
    return out


# -- timing -------------------------------------------------------------------------------------


def graph_time_us(calls: list[Callable[[], torch.Tensor]]) -> tuple[float, torch.Tensor]:
    """Capture ``calls`` in one CUDA graph, replay it; median us per call and the last
    call's output (as the replay left it)."""
    calls[0]()  # compiles (outside the capture) and surfaces launch errors
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for call in calls:
            out = call()  # earlier outputs are freed: the pool reuses their memory
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_REPLAYS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_REPLAYS)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    assert out is not None
    result = out.clone()
    del graph
    return ms * 1e3 / len(calls), result


class ShapeBench:
    """Weight copies and activations for one (N, K); times any GEMM function on them."""

    def __init__(self, n: int, k: int, l2_bytes: int, gen: torch.Generator) -> None:
        self.n, self.k = n, k
        self.weight_bytes = n * k * DTYPE.itemsize
        copies = max(2, math.ceil(L2_FLUSH_FACTOR * l2_bytes / self.weight_bytes))
        self.num_calls = min(MAX_CALLS_PER_GRAPH,
                             max(copies, math.ceil(REPLAY_BYTES / self.weight_bytes)))
        copies = min(copies, self.num_calls)
        # Scaled so outputs are O(1): entries ~ N(0, 1/K).
        self.weights = [(torch.randn(n, k, device="cuda", generator=gen) / math.sqrt(k)).to(DTYPE)
                        for _ in range(copies)]
        self.last_weight = self.weights[(self.num_calls - 1) % copies]

    def time(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             x: torch.Tensor) -> tuple[float, torch.Tensor]:
        ws = self.weights
        calls = [lambda w=ws[i % len(ws)]: fn(x, w) for i in range(self.num_calls)]
        return graph_time_us(calls)

    def gbps(self, us: float, m: int) -> float:
        moved = self.weight_bytes + m * (self.k + self.n) * DTYPE.itemsize
        return moved / (us * 1e-6) / 1e9


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def copy_bandwidth_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def precompile(configs: set[tuple[SkinnyConfig, int]], workers: int) -> float:
    """Compile every (config, rows) variant in a thread pool; failures are left for the
    timing loop to report."""
    t0 = time.perf_counter()
    k = 16384  # long enough that every candidate's split variant really splits
    w = torch.empty(256, k, dtype=DTYPE, device="cuda")
    xs = {m: torch.empty(m, k, dtype=DTYPE, device="cuda") for m in M_VALUES}
    with ThreadPoolExecutor(workers) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
        for cfg, m in configs:
            for split in sorted({1, cfg.split_k}):
                try:
                    compile_skinny_gemm(xs[m], w, config=SkinnyConfig(
                        cfg.path, cfg.block_n, cfg.block_k, split, cfg.num_warps,
                        cfg.num_stages))
                except Exception as e:  # reported again, per shape, by the timing loop
                    print(f"precompile {cfg} m={m}: {type(e).__name__}: {e}", file=sys.stderr)
    return time.perf_counter() - t0


# -- the run ------------------------------------------------------------------------------------


def bench_shape(sb: ShapeBench, m: int, cfgs: list[SkinnyConfig],
                gen: torch.Generator) -> dict[str, Any]:
    x = torch.randn(m, sb.k, device="cuda", generator=gen).to(DTYPE)
    ref = x.float() @ sb.last_weight.float().T
    row: dict[str, Any] = {"m": m, "n": sb.n, "k": sb.k, "weight_mb": sb.weight_bytes / 2**20,
                           "calls_per_graph": sb.num_calls}
    us, out = sb.time(lambda a, w: F.linear(a, w), x)
    row["cublas"] = {"us": us, "gbps": sb.gbps(us, m), "rel_error": rel_error(out, ref)}
    results = []
    for cfg in cfgs:
        entry: dict[str, Any] = {"config": cfg.to_tuple()}
        try:
            us, out = sb.time(lambda a, w, c=cfg: skinny_gemm(a, w, config=c), x)
            err = rel_error(out, ref)
            entry.update(us=us, gbps=sb.gbps(us, m), rel_error=err, ok=err < MAX_REL_ERROR)
        except Exception as e:  # one failing config must not end the run
            entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.synchronize()
        results.append(entry)
    row["skinny"] = results
    good = [r for r in results if r.get("ok")]
    row["best"] = min(good, key=lambda r: r["us"]) if good else None
    dflt = default_config(m, sb.n, sb.k)
    row["default"] = next((r for r in results if r["config"] == dflt.to_tuple()), None)
    if row["default"] is None:  # the default is not among the candidates: time it too
        try:
            us, out = sb.time(lambda a, w: skinny_gemm(a, w, config=dflt), x)
            row["default"] = {"config": dflt.to_tuple(), "us": us, "gbps": sb.gbps(us, m),
                              "rel_error": rel_error(out, ref)}
        except Exception as e:
            row["default"] = {"config": dflt.to_tuple(), "error": f"{type(e).__name__}: {e}"}
    return row


def bench_prologue(sb: ShapeBench, layer: str, m: int, cfg: tuple, gen: torch.Generator
                   ) -> dict[str, Any]:
    """The op before the layer run separately (two launches) against the fused prologue, same
    config: silu_and_mul before down_proj, RMSNorm with the residual add before qkv and
    gate_up."""
    from tachyon.layers.fused import rms_norm, silu_and_mul

    config = SkinnyConfig.from_tuple(cfg)
    if layer == "down_proj":
        x = torch.randn(m, 2 * sb.k, device="cuda", generator=gen).to(DTYPE)
        two, out2 = sb.time(lambda a, w: skinny_gemm(silu_and_mul(a), w, config=config), x)
        one, out1 = sb.time(lambda a, w: skinny_gemm(a, w, config=config,
                                                     prologue=Prologue.SILU_MUL), x)
    else:
        x = torch.randn(m, sb.k, device="cuda", generator=gen).to(DTYPE)
        res = torch.randn(m, sb.k, device="cuda", generator=gen).to(DTYPE)
        g = (torch.rand(sb.k, device="cuda", generator=gen) + 0.5).to(DTYPE)

        def separate(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            h, _ = rms_norm(a, g, 1e-6, res)
            return skinny_gemm(h, w, config=config)

        two, out2 = sb.time(separate, x)
        one, out1 = sb.time(
            lambda a, w: skinny_gemm_rms_norm(a, g, 1e-6, w, None, res, config=config)[0], x)
    diff = rel_error(out1, out2.float())
    return {"layer": layer, "m": m, "n": sb.n, "k": sb.k, "config": cfg, "separate_us": two,
            "fused_us": one, "rel_diff": diff, "ok": diff < MAX_REL_ERROR}


def choose_table(rows: list[dict[str, Any]]) -> dict[tuple[int, int, int], tuple | None]:
    """Per shape class: the config with the best mean (time / best time) over the class's
    shapes, or None where cuBLAS is faster."""
    by_class: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["best"] is not None:
            by_class.setdefault(shape_class(r["m"], r["n"], r["k"]), []).append(r)
    table: dict[tuple[int, int, int], tuple | None] = {}
    for key, members in sorted(by_class.items()):
        scores: dict[tuple, list[float]] = {}
        for r in members:
            for c in r["skinny"]:
                if c.get("ok"):
                    scores.setdefault(tuple(c["config"]), []).append(c["us"] / r["best"]["us"])
        common = {c: s for c, s in scores.items() if len(s) == len(members)}
        if not common:  # the shapes share no config: follow the one with most bytes
            biggest = max(members, key=lambda r: r["n"] * r["k"])
            members = [biggest]
            common = {tuple(biggest["best"]["config"]): [1.0]}
        cfg = min(common, key=lambda c: statistics.mean(common[c]))
        cfg_us = sum(next(c["us"] for c in r["skinny"] if tuple(c["config"]) == cfg)
                     for r in members)
        cublas_us = sum(r["cublas"]["us"] for r in members)
        table[key] = cfg if cfg_us < cublas_us * (1 - CUBLAS_MARGIN) else None
    return table


def table_module(table: dict[tuple[int, int, int], tuple | None], device: str) -> str:
    """The table file: the repo's docstring and imports, then the measured entries."""
    src = inspect.getsource(skinny_gemm_table)
    head = src[: src.index("# Where the entries were measured")]
    lines = [head + "# Where the entries were measured.",
             f"TUNED_DEVICE = {device!r}",
             "TUNED_CONFIGS: dict[tuple[int, int, int], tuple[str, int, int, int, int, int] "
             "| None] = {"]
    lines += [f"    {key!r}: {cfg!r}," for key, cfg in sorted(table.items())]
    lines.append("}")
    return "\n".join(lines) + "\n"


def step_totals(rows_by_shape: dict[tuple[int, int, int], dict[str, Any]],
                table: dict[tuple[int, int, int], tuple | None]) -> dict[str, Any]:
    """GEMM time of one decode step per model and M: cuBLAS everywhere vs the table."""
    totals: dict[str, Any] = {}
    for model, spec in MODELS.items():
        layers = spec[-1]
        for m in M_VALUES:
            cublas = tuned = 0.0
            for name, n, k in layer_shapes(model):
                r = rows_by_shape.get((m, n, k))
                if r is None:
                    break
                times = layers if name != "lm_head" else 1
                choice = table.get(shape_class(m, n, k))
                pick = r["cublas"]["us"]
                if choice is not None:
                    pick = next((c["us"] for c in r["skinny"]
                                 if tuple(c["config"]) == choice and c.get("ok")), pick)
                cublas += times * r["cublas"]["us"]
                tuned += times * pick
            else:
                totals[f"{model} M={m}"] = {"cublas_ms": cublas / 1e3, "tuned_ms": tuned / 1e3,
                                            "speedup": cublas / tuned}
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few candidates per shape")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="past this, remaining shapes time cuBLAS and the default only")
    parser.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="threads for the up-front compiles; 0: compile lazily")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "./out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    gen = torch.Generator(device="cuda").manual_seed(0)
    report: dict[str, Any] = {
        "device": props.name, "num_sms": num_sms, "l2_bytes": l2_bytes,
        "torch": torch.__version__, "triton": triton.__version__,
        "copy_gbps": copy_bandwidth_gbps(), "nominal_copy_gbps": NOMINAL_COPY_GBPS,
    }
    print(f"{props.name}: {num_sms} SMs, L2 {l2_bytes >> 20} MB, copy "
          f"{report['copy_gbps']:.0f} GB/s (nominal {NOMINAL_COPY_GBPS:.0f})")

    # Model by model (the smallest, the issue's target, first), each (N, K) once.
    shapes = list(dict.fromkeys((n, k) for model in args.models
                                for _, n, k in layer_shapes(model)))
    plan = {(m, n, k): candidates(m, n, k, num_sms, args.quick)
            for n, k in shapes for m in M_VALUES}
    variants = {(SkinnyConfig(c.path, c.block_n, c.block_k, 2, c.num_warps, c.num_stages), m)
                for (m, _, _), cfgs in plan.items() for c in cfgs}
    workers = args.compile_workers
    report["compile_s"] = precompile(variants, workers) if workers else 0.0
    print(f"compiled {len(variants)} variants in {report['compile_s']:.0f} s; "
          f"{sum(map(len, plan.values()))} measurements to go")

    rows: list[dict[str, Any]] = []
    report["rows"] = rows
    json_path = out_dir / "gemm_bench.json"
    for n, k in shapes:
        sb = ShapeBench(n, k, l2_bytes, gen)
        for m in M_VALUES:
            over = time.perf_counter() - t_start > args.budget_s
            cfgs = [] if over else plan[(m, n, k)]
            try:
                row = bench_shape(sb, m, cfgs, gen)
            except Exception:
                traceback.print_exc()
                continue
            row["truncated"] = over
            rows.append(row)
            print_row(row)
        json_path.write_text(json.dumps(report, indent=1, default=str))  # progress so far
        del sb
        torch.cuda.empty_cache()

    table = choose_table(rows)
    report["table"] = {str(key): cfg for key, cfg in table.items()}
    rows_by_shape = {(r["m"], r["n"], r["k"]): r for r in rows}
    report["step_totals"] = step_totals(rows_by_shape, table)
    report["prologues"] = []
    for model in args.models:
        for layer, n, k in layer_shapes(model):
            if layer not in ("qkv_proj", "gate_up_proj", "down_proj"):
                continue
            if time.perf_counter() - t_start > args.budget_s + PROLOGUE_BUDGET_S:
                break
            sb = ShapeBench(n, k, l2_bytes, gen)
            for m in (1, 8, 16):
                r = rows_by_shape.get((m, n, k))
                if not (r and r["best"]):
                    continue
                try:
                    report["prologues"].append(
                        bench_prologue(sb, layer, m, r["best"]["config"], gen))
                except Exception as e:
                    report["prologues"].append({"layer": layer, "m": m, "n": n, "k": k,
                                                "error": repr(e)})
            del sb
            torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - t_start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    module = table_module(table, props.name)
    (out_dir / "skinny_gemm_table.py").write_text(module)
    print_summary(report, module, out_dir)


def print_row(r: dict[str, Any]) -> None:
    cb = r["cublas"]
    frac = 1 / NOMINAL_COPY_GBPS
    line = (f"M={r['m']:>2} N={r['n']:>6} K={r['k']:>5} {r['weight_mb']:7.1f} MB | cuBLAS "
            f"{cb['us']:7.1f} us {cb['gbps']:5.0f} GB/s {cb['gbps'] * frac:4.2f}")
    best = r["best"]
    if best:
        line += (f" | best {best['us']:7.1f} us {best['gbps']:5.0f} GB/s "
                 f"{best['gbps'] * frac:4.2f} x{cb['us'] / best['us']:4.2f} {best['config']}")
    d = r.get("default") or {}
    if "us" in d:
        line += f" | default {d['us']:7.1f} us"
    failed = [c for c in r["skinny"] if not c.get("ok")]
    if failed:
        line += f" | {len(failed)} failed"
    print(line, flush=True)


def print_summary(report: dict[str, Any], module: str, out_dir: Path) -> None:
    print("\nDecode-step GEMM time (all layers + LM head), cuBLAS vs the table:")
    for name, t in report["step_totals"].items():
        print(f"  {name:22} cuBLAS {t['cublas_ms']:7.3f} ms  table {t['tuned_ms']:7.3f} ms  "
              f"x{t['speedup']:.2f}")
    if report["prologues"]:
        print("\nPrologue fusion: the op before the layer + GEMM vs one launch (same config):")
        for r in report["prologues"]:
            head = f"  {r['layer']:12} M={r['m']:>2} N={r['n']:>6} K={r['k']:>5}:"
            if "error" in r:
                print(head, r["error"])
            else:
                print(f"{head} separate {r['separate_us']:6.1f} us, fused {r['fused_us']:6.1f} "
                      f"us, rel diff {r['rel_diff']:.1e}{'' if r['ok'] else '  WRONG'}")
    errors = {c.get("error") for r in report["rows"] for c in r["skinny"] if c.get("error")}
    wrong = [(r["m"], r["n"], r["k"], c["config"]) for r in report["rows"] for c in r["skinny"]
             if "rel_error" in c and not c["ok"]]
    if errors:
        print(f"\n{len(errors)} distinct config errors, e.g. {sorted(errors)[:3]}")
    if wrong:
        print(f"\nWRONG RESULTS (rel error > {MAX_REL_ERROR}): {wrong[:10]}")
    print(f"\nwall {report['wall_s']:.0f} s (compile {report['compile_s']:.0f} s). "
          f"Copy {out_dir / 'skinny_gemm_table.py'} over "
          "src/tachyon/layers/kernels/skinny_gemm_table.py:\n")
    print(module)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
