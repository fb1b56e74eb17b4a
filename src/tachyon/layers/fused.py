"""Fused Triton kernels for the small per-token layers.

Eager PyTorch runs RMSNorm as ~6 kernels, rotary as ~10 and SiLU-and-mul as 3; at decode
batch sizes each is a ~1-2 us launch doing almost nothing, and together they cost more than
the matmuls. Each function here is one kernel, one pass over its data.

Every function has a torch reference next to it (``*_ref``). The layers use the Triton
version on CUDA, and the reference on CPU and while torch.compile traces (Inductor then
fuses the reference itself). CPU tests run the kernels under ``TRITON_INTERPRET=1``.

Arithmetic is written in fp32, with an explicit rounding (``_round``) wherever the torch
reference rounds to the input dtype. On a GPU that gives the values of half-precision
arithmetic: a product or sum of two bf16/fp16 numbers computed in fp32 and rounded once is
the correctly rounded half-precision result. It is also the only form the Triton interpreter
gets right: it holds bfloat16 as raw uint16 bits, and adds or multiplies those bits as
integers (casts are the one bf16 operation it emulates). Weights have the input's dtype, as
tachyon's layers hold them.
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
    def _round(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to ``dtype`` and back: a rounding of the reference, kept in fp32."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride,
                         res_stride, out_stride, eps, HAS_RES: tl.constexpr,
                         BLOCK: tl.constexpr):
        # One program per row: load (x [+ residual]), write the sum back as the new residual,
        # normalise in fp32, round to the input dtype, then scale (the HF order of operations).
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            x = _round(x + r.to(tl.float32), dtype)  # the sum, as the input dtype holds it
            tl.store(res_out_ptr + row * res_stride + cols, x, mask=mask)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, _round(x * inv, dtype) * w, mask=mask)


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
        up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
        # silu in fp32, rounded to the input dtype before the product, as F.silu does.
        act = _round(gate / (1.0 + tl.exp(-gate)), x_ptr.dtype.element_ty)
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
    def _rotate_head(x_ptr, w_ptr, cache_ptr, out_ptr, pos, eps, HAS_NORM: tl.constexpr,
                     HALF: tl.constexpr):
        # [optional RMSNorm over the head] then rotate its two halves by the position's angle.
        # cos/sin rows of the cache: [cos | sin], HALF each.
        offs = tl.arange(0, HALF)
        dtype = x_ptr.dtype.element_ty
        x1 = tl.load(x_ptr + offs).to(tl.float32)
        x2 = tl.load(x_ptr + HALF + offs).to(tl.float32)
        if HAS_NORM:
            # RMSNorm as in HF: normalised in fp32 and rounded, times the weight (rounded).
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
            w1 = tl.load(w_ptr + offs).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
            x1 = _round(_round(x1 * inv, dtype) * w1, dtype)
            x2 = _round(_round(x2 * inv, dtype) * w2, dtype)
        cos = tl.load(cache_ptr + pos * 2 * HALF + offs)
        sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + offs)
        tl.store(out_ptr + offs, (x1 * cos - x2 * sin).to(dtype))
        tl.store(out_ptr + HALF + offs, (x2 * cos + x1 * sin).to(dtype))

    @triton.jit
    def _norm_rope_qk_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, pos_ptr, cache_ptr, q_out_ptr,
                             k_out_ptr, num_q_heads, q_stride_t, q_stride_h, k_stride_t,
                             k_stride_h, q_out_stride_t, k_out_stride_t, eps,
                             HAS_NORM: tl.constexpr, HALF: tl.constexpr):
        # One program per (token, head) over the query heads then the key heads: one launch
        # rotates both.
        t = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + t)
        if h < num_q_heads:
            _rotate_head(q_ptr + t * q_stride_t + h * q_stride_h, qw_ptr, cache_ptr,
                         q_out_ptr + t * q_out_stride_t + h * 2 * HALF, pos, eps,
                         HAS_NORM, HALF)
        else:
            hk = h - num_q_heads
            _rotate_head(k_ptr + t * k_stride_t + hk * k_stride_h, kw_ptr, cache_ptr,
                         k_out_ptr + t * k_out_stride_t + hk * 2 * HALF, pos, eps,
                         HAS_NORM, HALF)


def norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None = None,
              k_weight: torch.Tensor | None = None, eps: float = 1e-6
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (any strides on T and heads; unit stride inside a head)
    -> new contiguous (q, k) with the optional per-head RMSNorms and the rotation applied."""
    t, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        has_norm = q_weight is not None
        _norm_rope_qk_kernel[(t, hq + hk)](
            q, k, q_weight if has_norm else q, k_weight if has_norm else k, positions,
            cos_sin_cache, q_out, k_out, hq, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), q_out.stride(0), k_out.stride(0), eps, HAS_NORM=has_norm,
            HALF=d // 2, num_warps=1)
    return q_out, k_out
