"""RMSNorm over the head dimension of q or k, fused with rotary position embedding.

HunyuanVideo normalises q and k per head (RMSNorm with a learned weight over D) and
then rotates the image tokens. Its rotary convention (diffusers `apply_rotary_emb`,
use_real=True, use_real_unbind_dim=-1) pairs *adjacent* elements: for pair i,
real = x[2i], imag = x[2i+1], and the rotated vector is
    out[2i]   = x[2i]   * cos[2i]   - x[2i+1] * sin[2i]
    out[2i+1] = x[2i+1] * cos[2i+1] + x[2i]   * sin[2i+1]
with cos/sin given per element, shape (S, D) (each frequency repeated for its pair).

In the single-stream blocks image and text tokens share one sequence with the image
tokens first; only the first `rope_tokens` tokens are rotated, the text tokens after
them get the norm alone. Eager torch needs a float32 copy, a reduction, three
multiplies, a stack/flatten for the rotation, two slices and a cat; the kernel reads
q once and writes it once. Computed in float32, rounded once to x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_kernels.validation import (
    check_float_tensor,
    check_launchable,
    check_shape,
    check_unit_last_stride,
    output_like,
)

# One program owns up to HEADS_PER_PROGRAM heads of one token (a power of two; 8
# divides the model's 24 heads, so no lanes idle; padding 24 to 32 measured slower)
# and loads that token's cos/sin once. One warp: 32 elements per thread.
HEADS_PER_PROGRAM = 8
NUM_WARPS = 1
MAX_HEAD_DIM = 1024


def rotate_pairs_reference(x: torch.Tensor) -> torch.Tensor:
    """(real, imag) pairs of adjacent elements -> (-imag, real)."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-imag, real), dim=-1).flatten(-2)


def qk_rmsnorm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float = 1e-6,
    rope_tokens: int | None = None,
) -> torch.Tensor:
    """RMSNorm over D with `weight`, then RoPE on the first `rope_tokens` tokens.

    x: (B, S, H, D); weight: (D,); cos, sin: (rope_tokens, D) or both None (norm only).
    rope_tokens defaults to S. Computed in float32, returned in x.dtype.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if cos is None:
        return normed.to(x.dtype)
    rope_tokens = x.shape[1] if rope_tokens is None else rope_tokens
    image, text = normed[:, :rope_tokens], normed[:, rope_tokens:]
    cos_b = cos.float()[None, :, None, :]
    sin_b = sin.float()[None, :, None, :]
    image = image * cos_b + rotate_pairs_reference(image) * sin_b
    return torch.cat((image, text), dim=1).to(x.dtype)


@triton.jit
def _qk_rmsnorm_rope_kernel(
    x_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    seq_len,
    heads,
    head_dim,
    rope_tokens,
    x_stride_b,
    x_stride_s,
    x_stride_h,
    cos_stride_s,
    sin_stride_s,
    out_stride_b,
    out_stride_s,
    out_stride_h,
    eps,
    HAS_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    d_mask = d < head_dim
    mask = (h < heads) & d_mask

    x_row = x_ptr + b * x_stride_b + s * x_stride_s + h * x_stride_h
    x = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / head_dim + eps)[:, None]
    weight = tl.load(weight_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    out = x * rstd * weight

    if HAS_ROPE:
        # Text tokens (s >= rope_tokens) read no columns of cos/sin and get cos = 1,
        # sin = 0 instead: the normalised value passes unchanged.
        rope_columns = tl.where(s < rope_tokens, head_dim, 0)
        rope_mask = d < rope_columns
        cos = tl.load(cos_ptr + s * cos_stride_s + d, mask=rope_mask, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + s * sin_stride_s + d, mask=rope_mask, other=0.0).to(tl.float32)
        # Split the adjacent (real, imag) pairs in registers: the loads stay contiguous.
        real, imag = tl.split(tl.reshape(out, (BLOCK_H, BLOCK_D // 2, 2)))
        cos_real, cos_imag = tl.split(tl.reshape(cos, (1, BLOCK_D // 2, 2)))
        sin_real, sin_imag = tl.split(tl.reshape(sin, (1, BLOCK_D // 2, 2)))
        rotated = tl.join(real * cos_real - imag * sin_real, imag * cos_imag + real * sin_imag)
        out = tl.reshape(rotated, (BLOCK_H, BLOCK_D))

    out_row = out_ptr + b * out_stride_b + s * out_stride_s + h * out_stride_h
    tl.store(out_row + d, out.to(out_ptr.dtype.element_ty), mask=mask)


def qk_rmsnorm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float = 1e-6,
    rope_tokens: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused `qk_rmsnorm_rope_reference`.

    x: (B, S, H, D) with unit stride over D (a head view of a fused qkv projection is
    fine). weight: (D,). cos, sin: (rope_tokens, D), or both None for the norm alone
    (the text stream of the dual-stream blocks). rope_tokens defaults to S.
    Returns a new contiguous tensor in x.dtype, or writes into `out` (same shape and
    dtype; may be x itself, or a slice of a larger buffer so no cat is needed).
    """
    op = "qk_rmsnorm_rope"
    check_float_tensor(op, "x", x, 4)
    check_float_tensor(op, "weight", weight, 1)
    batch, seq_len, heads, head_dim = x.shape
    check_shape(op, "weight", weight, (head_dim,))
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim is {head_dim}; allowed at most {MAX_HEAD_DIM}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: cos and sin must both be tensors or both be None")
    has_rope = cos is not None
    if has_rope:
        rope_tokens = seq_len if rope_tokens is None else rope_tokens
        if not 0 <= rope_tokens <= seq_len:
            raise ValueError(f"{op}: rope_tokens is {rope_tokens}; allowed 0..{seq_len} (the sequence length)")
        if head_dim % 2:
            raise ValueError(f"{op}: head_dim is {head_dim}; rotary embedding needs an even head_dim")
        check_float_tensor(op, "cos", cos, 2)
        check_float_tensor(op, "sin", sin, 2)
        check_shape(op, "cos", cos, (rope_tokens, head_dim))
        check_shape(op, "sin", sin, (rope_tokens, head_dim))
    elif rope_tokens is not None:
        raise ValueError(f"{op}: rope_tokens is {rope_tokens} but cos/sin are None")
    out = output_like(op, "out", out, x)
    tensors = {"x": x, "weight": weight, "out": out}
    if has_rope:
        tensors.update(cos=cos, sin=sin)
    for name, tensor in tensors.items():
        check_unit_last_stride(op, name, tensor)
    check_launchable(op, _qk_rmsnorm_rope_kernel, **tensors)
    if x.numel() == 0:
        return out

    block_h, block_d = min(HEADS_PER_PROGRAM, triton.next_power_of_2(heads)), triton.next_power_of_2(head_dim)
    # Without RoPE the cos/sin pointers are never read; x stands in for them.
    cos_arg, sin_arg = (cos, sin) if has_rope else (x, x)
    _qk_rmsnorm_rope_kernel[(batch * seq_len, triton.cdiv(heads, block_h))](
        x, weight, cos_arg, sin_arg, out,
        seq_len, heads, head_dim, rope_tokens if has_rope else 0,
        x.stride(0), x.stride(1), x.stride(2),
        cos_arg.stride(0), sin_arg.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        eps,
        HAS_ROPE=has_rope,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=NUM_WARPS,
    )
    return out
