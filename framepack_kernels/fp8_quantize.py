"""Per-token FP8 (e4m3) quantization of a linear layer's input, in one kernel.

The FP8 linear layers (framepack_backend/models/fp8.py) need each activation row as
e4m3 values plus one float32 scale, amax(|row|) / 448. In eager torch that is an abs,
a max-reduction, a float32 copy, a division and a cast: five passes and two full-size
temporaries. Here one program reads its row twice (the second read hits L2) and writes
one byte per element.

Two fusions on the way in, both for the blocks' MLPs:
- the row may be the concatenation [a | b] of two tensors (the single-stream block's
  output projection reads [attention | MLP] and the concatenation is never written);
- either part may pass through tanh-GELU first (the MLP activation is applied here
  instead of in a separate pass over the 4·dim-wide hidden state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from framepack_kernels.validation import check_float_tensor, check_launchable, check_unit_last_stride

E4M3_MAX = 448.0
# Smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12 / E4M3_MAX
BLOCK_K = 1024
NUM_WARPS = 4


def quantize_fp8_rows_reference(
    a: torch.Tensor, b: torch.Tensor | None = None, gelu_a: bool = False, gelu_b: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, ka) [and (…, kb)] -> (rows, ka + kb) float8_e4m3fn values and (rows, 1) float32 scales.

    Row r of the result is [gelu?(a[r]) | gelu?(b[r])] / scale[r], computed in float32,
    with scale[r] = max |row| / 448, so values · scale ≈ the row.
    """
    parts = [a.float()] + ([] if b is None else [b.float()])
    flags = [gelu_a, gelu_b]
    parts = [F.gelu(p, approximate="tanh") if flag else p for p, flag in zip(parts, flags)]
    rows = torch.cat(parts, dim=-1).reshape(-1, sum(p.shape[-1] for p in parts))
    scale = (rows.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(MIN_SCALE)
    return (rows / scale).to(torch.float8_e4m3fn), scale


@triton.jit
def _gelu_tanh(x):
    # tanh(z) = 2·sigmoid(2z) − 1; exact at both tails in float32.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * z)


@triton.jit
def _load_part(ptr, row, stride, cols, k, GELU: tl.constexpr):
    x = tl.load(ptr + row * stride + cols, mask=cols < k, other=0.0).to(tl.float32)
    if GELU:
        x = _gelu_tanh(x)
    return x


@triton.jit
def _quantize_fp8_rows_kernel(
    a_ptr,
    b_ptr,
    values_ptr,
    scale_ptr,
    ka,
    kb,
    a_stride,
    b_stride,
    values_stride,
    HAS_B: tl.constexpr,
    GELU_A: tl.constexpr,
    GELU_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, ka, BLOCK_K):
        amax = tl.maximum(amax, tl.abs(_load_part(a_ptr, row, a_stride, start + offsets, ka, GELU_A)))
    if HAS_B:
        for start in range(0, kb, BLOCK_K):
            amax = tl.maximum(amax, tl.abs(_load_part(b_ptr, row, b_stride, start + offsets, kb, GELU_B)))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12 / 448.0)
    tl.store(scale_ptr + row, scale)

    out = values_ptr + row * values_stride
    for start in range(0, ka, BLOCK_K):
        cols = start + offsets
        x = _load_part(a_ptr, row, a_stride, cols, ka, GELU_A)
        tl.store(out + cols, (x / scale).to(values_ptr.dtype.element_ty), mask=cols < ka)
    if HAS_B:
        for start in range(0, kb, BLOCK_K):
            cols = start + offsets
            x = _load_part(b_ptr, row, b_stride, cols, kb, GELU_B)
            tl.store(out + ka + cols, (x / scale).to(values_ptr.dtype.element_ty), mask=cols < kb)


@triton.jit
def store_fp8_row(values_row_ptr, scale_ptr, row, x, cols, mask):
    """Quantize one float32 row held in registers to e4m3 with its own scale, amax / 448.

    For kernels that produce an FP8 layer's input: the row is quantized where it is
    made instead of being written in bf16 and read back by `quantize_fp8_rows`.
    """
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    scale = tl.maximum(amax / 448.0, 1e-12 / 448.0)
    tl.store(scale_ptr + row, scale)
    tl.store(values_row_ptr + cols, (x / scale).to(values_row_ptr.dtype.element_ty), mask=mask)


def fp8_rows_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (rows, k) e4m3 values and (rows, 1) float32 scales for the rows of x (…, k)."""
    rows = math.prod(x.shape[:-1])
    values = torch.empty(rows, x.shape[-1], dtype=torch.float8_e4m3fn, device=x.device)
    return values, torch.empty(rows, 1, dtype=torch.float32, device=x.device)


def _rows(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.dim() < 2:
        raise ValueError(f"{op}: {name} must have a row dimension and a feature dimension, got shape {tuple(x.shape)}")
    check_float_tensor(op, name, x, x.dim())
    check_unit_last_stride(op, name, x)
    return x.reshape(-1, x.shape[-1])  # a view for the blocks' (B, S, C) activations


def quantize_fp8_rows(
    a: torch.Tensor, b: torch.Tensor | None = None, gelu_a: bool = False, gelu_b: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `quantize_fp8_rows_reference`: returns new (rows, ka + kb) e4m3 values
    (contiguous: the row-major operand `torch._scaled_mm` wants) and (rows, 1) scales."""
    op = "quantize_fp8_rows"
    a_rows = _rows(op, "a", a)
    b_rows = None
    if b is not None:
        b_rows = _rows(op, "b", b)
        if a.shape[:-1] != b.shape[:-1]:
            raise ValueError(
                f"{op}: a {tuple(a.shape)} and b {tuple(b.shape)} must agree in all but the last dimension"
            )
    ka = a_rows.shape[1]
    kb = 0 if b_rows is None else b_rows.shape[1]
    num_rows = a_rows.shape[0]
    values = torch.empty(num_rows, ka + kb, dtype=torch.float8_e4m3fn, device=a.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=a.device)
    check_launchable(op, _quantize_fp8_rows_kernel, a=a, **({} if b is None else {"b": b}))
    if num_rows == 0:
        return values, scale
    _quantize_fp8_rows_kernel[(num_rows,)](
        a_rows, a_rows if b_rows is None else b_rows, values, scale,
        ka, kb, a_rows.stride(0), 0 if b_rows is None else b_rows.stride(0), values.stride(0),
        HAS_B=b_rows is not None, GELU_A=gelu_a, GELU_B=gelu_b, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )
    return values, scale
