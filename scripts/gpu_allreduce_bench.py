"""NCCL all-reduce latency per message size, eager and replayed from a CUDA graph.

Run under torchrun, one process per GPU (scripts/gpu_tp_bench.sh does):

    torchrun --standalone --nproc-per-node 4 scripts/gpu_allreduce_bench.py --json out.json

bfloat16 messages of 1 KiB ... 64 MiB (a decode step's all-reduce is batch x hidden x 2 bytes:
10 KiB for one Qwen3-32B token, 2.5 MiB for 256). Per size: the median over ``--repeats``
timings of ``--iters`` back-to-back all-reduces, timed with CUDA events, as latency and NCCL's
bus bandwidth (algorithm bandwidth x 2(n-1)/n). Rank 0 writes the JSON. NVLink multicast
(NVLS) stays off, as on every TP run on these machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

MIN_BYTES, MAX_BYTES = 1 << 10, 64 << 20


def _time_ms(run: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``run`` on the device, in milliseconds."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_of(x: torch.Tensor, iters: int) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # NCCL's first calls on a stream must not be captured
        for _ in range(3):
            dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            dist.all_reduce(x)
    return graph


def _one_size(nbytes: int, iters: int, repeats: int, world: int) -> dict[str, float]:
    x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device="cuda")  # zeros: no inf

    def eager() -> None:
        for _ in range(iters):
            dist.all_reduce(x)

    eager()
    eager_us = _time_ms(eager, repeats) * 1e3 / iters
    graph = _graph_of(x, iters)
    graph.replay()
    graph_us = _time_ms(graph.replay, repeats) * 1e3 / iters
    del graph
    bus = 2 * (world - 1) / world

    def busbw(us: float) -> float:
        return nbytes / (us * 1e-6) * bus / 1e9

    return {"bytes": nbytes, "eager_us": eager_us, "graph_us": graph_us,
            "eager_busbw_gbps": busbw(eager_us), "graph_busbw_gbps": busbw(graph_us)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20, help="all-reduces per timing")
    p.add_argument("--repeats", type=int, default=15, help="timings per size (median)")
    p.add_argument("--json", default=None, metavar="PATH")
    ns = p.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    rows, nbytes = [], MIN_BYTES
    while nbytes <= MAX_BYTES:
        rows.append(_one_size(nbytes, ns.iters, ns.repeats, world))
        nbytes *= 2
    if dist.get_rank() == 0:
        print(f"{'bytes':>10} {'eager us':>9} {'graph us':>9} {'graph GB/s':>10}")
        for r in rows:
            print(f"{r['bytes']:>10} {r['eager_us']:9.1f} {r['graph_us']:9.1f} "
                  f"{r['graph_busbw_gbps']:10.1f}")
        report = {"world_size": world, "dtype": "bfloat16", "iters": ns.iters,
                  "repeats": ns.repeats, "gpu": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                  "nvls": os.environ["NCCL_NVLS_ENABLE"], "sizes": rows}
        if ns.json:
            Path(ns.json).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
