"""Fused Triton kernels for the small per-token layers.

Eager PyTorch runs RMSNorm as ~6 kernels, rotary as ~10 and SiLU-and-mul as 3; at decode
batch sizes each is a ~1-2 us launch doing almost nothing, and together they cost more than
the matmuls. Each function here is one kernel, one pass over its data.

Every function has a torch reference next to it (``*_ref``). The layers use the Triton
version on CUDA, and the reference on CPU and while torch.compile traces (Inductor then
fuses the reference itself). CPU tests run the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and not torch.compiler.is_compiling()


# -- RMSNorm, optionally with the residual add ----------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(dtype) if dtype != torch.float32 else xf) * weight


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride,
                         res_stride, out_stride, eps, HAS_RES: tl.constexpr,
                         BLOCK: tl.constexpr):
        # One program per row: load (x [+ residual]), write the sum back as the new residual,
        # normalise in fp32, round to the input dtype, then scale (the HF order of operations).
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            tl.store(res_out_ptr + row * res_stride + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (xf * inv).to(x.dtype) * w
        tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.

    ``x`` may be any shape whose last dim is the normalised one (e.g. [T, heads, head_dim]).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    n = x2.shape[0]
    block = triton.next_power_of_2(shape[-1])
    if residual is None:
        if n:
            _rms_norm_kernel[(n,)](x2, x2, weight, out, out, shape[-1], x2.stride(0), 0,
                                   out.stride(0), eps, HAS_RES=False, BLOCK=block,
                                   num_warps=_warps(block))
        return out.view(shape)
    res2 = residual.reshape(-1, shape[-1])
    new_res = torch.empty_like(res2)
    if n:
        _rms_norm_kernel[(n,)](x2, res2, weight, out, new_res, shape[-1], x2.stride(0),
                               res2.stride(0), out.stride(0), eps, HAS_RES=True, BLOCK=block,
                               num_warps=_warps(block))
    return out.view(shape), new_res.view(shape)


def _warps(block: int) -> int:
    # Enough threads to cover a row with 8-element vectors, at most 8 warps.
    return max(1, min(8, block // 256))


# -- SiLU and mul ---------------------------------------------------------------------------


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, d, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0)
        # silu in fp32, rounded to the input dtype before the product, as F.silu does.
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(out_ptr + row * out_stride + cols, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)


# -- rotary embedding (NeoX layout), optionally after a per-head RMSNorm (Qwen3) --------------


def rope_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


if triton is not None:

    @triton.jit
    def _norm_rope_kernel(x_ptr, w_ptr, pos_ptr, cache_ptr, out_ptr, num_heads, x_stride_t,
                          x_stride_h, out_stride_t, out_stride_h, eps, HAS_NORM: tl.constexpr,
                          HALF: tl.constexpr):
        # One program per (token, head): [optional RMSNorm over the head] then rotate the two
        # halves of the head by the position's angle. cos/sin rows: [cos | sin], HALF each.
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF)
        base = x_ptr + t * x_stride_t + h * x_stride_h
        x1 = tl.load(base + offs)
        x2 = tl.load(base + HALF + offs)
        dtype = x1.dtype
        if HAS_NORM:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
            x1 = (f1 * inv).to(dtype) * tl.load(w_ptr + offs)
            x2 = (f2 * inv).to(dtype) * tl.load(w_ptr + HALF + offs)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cache_ptr + pos * 2 * HALF + offs)
        sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + offs)
        obase = out_ptr + t * out_stride_t + h * out_stride_h
        tl.store(obase + offs, (x1 * cos - x2 * sin).to(dtype))
        tl.store(obase + HALF + offs, (x2 * cos + x1 * sin).to(dtype))


def norm_rope(positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor,
              weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """x: [T, heads, head_dim] (any strides on T and heads) -> a new contiguous tensor with
    the optional per-head RMSNorm and the rotation applied."""
    t, heads, d = x.shape
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    if t:
        _norm_rope_kernel[(t, heads)](
            x, weight if weight is not None else x, positions, cos_sin_cache, out, heads,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), eps,
            HAS_NORM=weight is not None, HALF=d // 2, num_warps=1)
    return out
