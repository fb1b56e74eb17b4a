"""Attention kernel micro-benchmarks: split-KV decode bandwidth against the device copy ceiling.

Decode attention is memory bound (each cached K/V element is read once and used for a couple
of multiply-adds per query head), so the figure of merit is bytes moved per second compared
with what a plain device-to-device copy achieves on the same GPU.

    python -m tachyon.bench.kernel_bench            # JSON report, default and small batches
    python -m tachyon.bench.kernel_bench --sweep    # also a table over tile/warp/split choices
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.testing

from tachyon.attention.kernels.decode import choose_num_splits, decode_attention, decode_workspace
from tachyon.attention.kernels.unified import unified_attention
from tachyon.bench.common import BenchError, run_bench

# Copy size for the bandwidth ceiling: far larger than L2 (50 MB on H100) so it measures HBM.
COPY_BYTES = 2 << 30
# do_bench budgets in milliseconds: (warm-up, repetitions) for reports and for sweeps.
REPORT_BUDGET_MS = (50, 300)
SWEEP_BUDGET_MS = (10, 40)


def _median_ms(fn, budget_ms: tuple[int, int] = REPORT_BUDGET_MS) -> float:
    warmup, rep = budget_ms
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth_gbps(device: torch.device, nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _decode_inputs(
    num_reqs: int,
    context: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict:
    """Random query and cache; every request owns ``context`` positions in shuffled blocks."""
    blocks_per_req = triton.cdiv(context, block_size)
    num_blocks = num_reqs * blocks_per_req
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    perm = torch.randperm(num_blocks, device=device, dtype=torch.int64)
    return dict(
        query=torch.randn(num_reqs, num_heads, head_dim, device=device, dtype=dtype),
        k_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        v_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        seq_lens=torch.full((num_reqs,), context, dtype=torch.int32, device=device),
        block_table=perm.view(num_reqs, blocks_per_req).to(torch.int32),
    )


def _decode_bytes(
    num_reqs: int,
    context: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """The fewest bytes decode must move: K and V of every context once, q in, out."""
    elem = torch.finfo(dtype).bits // 8
    kv = 2 * num_reqs * context * num_kv_heads * head_dim * elem
    return kv + 2 * num_reqs * num_heads * head_dim * elem


def _time_decode(
    inputs: dict, num_splits: int, budget_ms: tuple[int, int] = REPORT_BUDGET_MS, **tuning: int
) -> float:
    query = inputs["query"]
    num_reqs, num_heads, head_dim = query.shape
    out = torch.empty_like(query)
    workspace = decode_workspace(num_reqs, num_heads, head_dim, num_splits, query.device)
    scale = head_dim**-0.5

    def run() -> None:
        decode_attention(
            query,
            inputs["k_cache"],
            inputs["v_cache"],
            out,
            inputs["seq_lens"],
            inputs["block_table"],
            scale,
            num_splits,
            workspace,
            **tuning,
        )

    return _median_ms(run, budget_ms)


def _time_unified_decode(inputs: dict) -> float:
    """The varlen kernel on the same one-token-per-request batch, for comparison."""
    query = inputs["query"]
    num_reqs, _, head_dim = query.shape
    out = torch.empty_like(query)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device=query.device)

    def run() -> None:
        unified_attention(
            query,
            inputs["k_cache"],
            inputs["v_cache"],
            out,
            qsl,
            inputs["seq_lens"],
            inputs["block_table"],
            head_dim**-0.5,
            num_reqs,
        )

    return _median_ms(run)


def decode_bandwidth_report(
    num_reqs: int = 256,
    context: int = 1024,
    num_heads: int = 16,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    *,
    copy_gbps: float | None = None,
) -> dict:
    """Time ``decode_attention`` (median) and compare its bandwidth with a device copy.

    Defaults are Qwen3-0.6B's attention (16 query heads, 8 KV heads, head_dim 128).
    ``copy_gbps`` reuses an earlier ``copy_bandwidth_gbps`` measurement. The report also
    times the varlen ``unified_attention`` kernel on the same batch (``unified_*`` keys).
    """
    device = torch.device("cuda")
    inputs = _decode_inputs(
        num_reqs, context, num_heads, num_kv_heads, head_dim, block_size, dtype, device
    )
    num_splits = choose_num_splits(num_reqs, num_kv_heads, device)
    ms = _time_decode(inputs, num_splits)
    nbytes = _decode_bytes(num_reqs, context, num_heads, num_kv_heads, head_dim, dtype)
    gbps = nbytes / (ms * 1e-3) / 1e9
    unified_ms = _time_unified_decode(inputs)
    if copy_gbps is None:
        copy_gbps = copy_bandwidth_gbps(device)
    return dict(
        device=torch.cuda.get_device_name(device),
        num_reqs=num_reqs,
        context=context,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=str(dtype).removeprefix("torch."),
        num_splits=num_splits,
        time_us=round(ms * 1e3, 2),
        bytes=nbytes,
        decode_gbps=round(gbps, 1),
        copy_gbps=round(copy_gbps, 1),
        fraction_of_copy=round(gbps / copy_gbps, 3),
        unified_time_us=round(unified_ms * 1e3, 2),
        unified_gbps=round(nbytes / (unified_ms * 1e-3) / 1e9, 1),
    )


def _sweep_decode(copy_gbps: float) -> list[str]:
    """Tuning aid: tile / warp / stage choices on a large and a small batch at the default
    split count, then split counts around the default on small batches."""
    rows = [
        f"{'shape':>12} {'splits':>6} {'block_n':>7} {'warps':>5} {'stages':>6} "
        f"{'us':>8} {'GB/s':>7} {'frac':>5}"
    ]
    device = torch.device("cuda")

    def add(num_reqs: int, context: int, inputs: dict, splits: int, **tuning: int) -> None:
        nbytes = _decode_bytes(num_reqs, context, 16, 8, 128, torch.bfloat16)
        ms = _time_decode(inputs, splits, SWEEP_BUDGET_MS, **tuning)
        gbps = nbytes / (ms * 1e-3) / 1e9
        knobs = " ".join(
            f"{tuning.get(k, '-'):>{w}}"
            for k, w in [("block_n", 7), ("num_warps", 5), ("num_stages", 6)]
        )
        rows.append(
            f"{num_reqs:>4}x{context:<7} {splits:>6} {knobs} {ms * 1e3:>8.1f} "
            f"{gbps:>7.0f} {gbps / copy_gbps:>5.2f}"
        )

    for num_reqs, context in [(256, 1024), (4, 8192)]:
        inputs = _decode_inputs(num_reqs, context, 16, 8, 128, 16, torch.bfloat16, device)
        splits = choose_num_splits(num_reqs, 8, device)
        for block_n, warps, stages in itertools.product((16, 32, 64), (2, 4), (2, 3, 4)):
            add(
                num_reqs,
                context,
                inputs,
                splits,
                block_n=block_n,
                num_warps=warps,
                num_stages=stages,
            )
    for num_reqs, context in [(32, 4096), (4, 8192), (1, 16384)]:
        inputs = _decode_inputs(num_reqs, context, 16, 8, 128, 16, torch.bfloat16, device)
        default = choose_num_splits(num_reqs, 8, device)
        for splits in sorted({max(default // 2, 1), default, 2 * default}):
            add(num_reqs, context, inputs, splits)
    return rows


def _sweep_prefill() -> list[str]:
    """Varlen kernel on a plain prefill: 8 requests x 2048 tokens, Qwen3-0.6B heads."""
    device = torch.device("cuda")
    num_reqs, q_len, num_heads, num_kv_heads, head_dim, block_size = 8, 2048, 16, 8, 128, 16
    inputs = _decode_inputs(
        num_reqs, q_len, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16, device
    )
    num_tokens = num_reqs * q_len
    query = torch.randn(num_tokens, num_heads, head_dim, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(query)
    qsl = torch.arange(0, num_tokens + 1, q_len, dtype=torch.int32, device=device)
    # Causal attention: half of the q_len x q_len score matrix, two matmuls of 2 flops/MAC.
    flops = 4 * num_reqs * num_heads * head_dim * q_len * q_len / 2
    rows = [f"{'block_m':>7} {'block_n':>7} {'warps':>5} {'stages':>6} {'us':>9} {'TFLOP/s':>8}"]
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):

        def run(bm: int = block_m, bn: int = block_n, w: int = warps, s: int = stages) -> None:
            unified_attention(
                query,
                inputs["k_cache"],
                inputs["v_cache"],
                out,
                qsl,
                inputs["seq_lens"],
                inputs["block_table"],
                head_dim**-0.5,
                num_reqs,
                block_m=bm,
                block_n=bn,
                num_warps=w,
                num_stages=s,
            )

        try:
            ms = _median_ms(run, SWEEP_BUDGET_MS)
        except triton.runtime.errors.OutOfResources:
            rows.append(f"{block_m:>7} {block_n:>7} {warps:>5} {stages:>6} out of resources")
            continue
        rows.append(
            f"{block_m:>7} {block_n:>7} {warps:>5} {stages:>6} {ms * 1e3:>9.1f} "
            f"{flops / (ms * 1e-3) / 1e12:>8.1f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep tuning choices")
    args = parser.parse_args(argv)
    return run_bench("tachyon kernel_bench", lambda: _run(args.sweep))


def _run(sweep: bool) -> None:
    if not torch.cuda.is_available():
        raise BenchError("the kernel benchmark measures GPU bandwidth: it needs a CUDA GPU")
    copy_gbps = copy_bandwidth_gbps(torch.device("cuda"))
    if sweep:
        print("\n".join(_sweep_prefill()))
        print("\n".join(_sweep_decode(copy_gbps)))
    reports = [
        decode_bandwidth_report(copy_gbps=copy_gbps),
        decode_bandwidth_report(num_reqs=32, context=4096, copy_gbps=copy_gbps),
        decode_bandwidth_report(num_reqs=4, context=8192, copy_gbps=copy_gbps),
    ]
    print(json.dumps(reports, indent=1))


if __name__ == "__main__":
    sys.exit(main())
