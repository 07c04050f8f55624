"""Per-tensor FP8 (e4m3) quantization of attention inputs, and the way back.

cuDNN's FP8 attention (framepack_backend/cudnn_fp8_attention.py) takes q, k and v as
e4m3 values with one float32 descale each, and on Hopper writes its output in e4m3
too. The scales live on the GPU: the amax is reduced there and the quantizer reads it
from memory, so nothing waits on the host.

Tensors are (batch, seq, heads, head_dim) with heads and head_dim laid out together,
as the blocks produce them (a view of a (batch, seq, heads·head_dim) projection, or a
joint buffer); the batch and token strides may be anything.

Two launches per tensor: one reduces max |x| into an int32 cell (the bits of a
non-negative float order like integers, so an integer atomic max is exact and takes
NaN along), one writes x · 448 / amax as e4m3 and, from its first program, the
[descale, scale] pair: descale = amax / 448 turns values back into x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_kernels.fp8_quantize import E4M3_MAX
from framepack_kernels.validation import check_float_tensor, check_launchable, check_unit_last_stride

# An all-zero tensor quantizes to zeros instead of dividing by zero.
MIN_AMAX = 1e-12
BLOCK = 1024
NUM_WARPS = 4


def quantize_fp8_tensor_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> contiguous e4m3 values of x · scale and float32 [descale, scale], scale = 448 / amax|x|."""
    amax = x.float().abs().amax().clamp_min(MIN_AMAX)
    scale = E4M3_MAX / amax
    values = (x.float() * scale).to(torch.float8_e4m3fn).contiguous()
    return values, torch.stack([amax / E4M3_MAX, scale])


def dequantize_fp8_tensor_reference(values: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values · descale in float32, rounded once to `dtype`."""
    return (values.float() * descale.float().reshape(())).to(dtype)


@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, seq, width, stride_b, stride_s, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + (row // seq) * stride_b + (row % seq) * stride_s
    offsets = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + offsets
        x = tl.load(base + cols, mask=cols < width, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    row_max = tl.max(amax, axis=0)
    tl.atomic_max(amax_bits_ptr, row_max.to(tl.int32, bitcast=True))


@triton.jit
def _quantize_kernel(
    x_ptr, amax_bits_ptr, values_ptr, scales_ptr, seq, width, stride_b, stride_s, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.maximum(tl.load(amax_bits_ptr).to(tl.float32, bitcast=True), 1e-12)
    scale = 448.0 / amax
    if row == 0:
        tl.store(scales_ptr, amax / 448.0)
        tl.store(scales_ptr + 1, scale)
    base = x_ptr + (row // seq) * stride_b + (row % seq) * stride_s
    out = values_ptr + row * width
    offsets = tl.arange(0, BLOCK)
    for start in range(0, width, BLOCK):
        cols = start + offsets
        x = tl.load(base + cols, mask=cols < width, other=0.0).to(tl.float32)
        tl.store(out + cols, (x * scale).to(values_ptr.dtype.element_ty), mask=cols < width)


@triton.jit
def _dequantize_kernel(values_ptr, descale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    descale = tl.load(descale_ptr)
    x = tl.load(values_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x * descale).to(out_ptr.dtype.element_ty), mask=offsets < n)


def _rows_of(op: str, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, width, batch stride, token stride) of a (B, S, H, D) tensor whose heads and head_dim are contiguous."""
    check_float_tensor(op, "x", x, 4)
    check_unit_last_stride(op, "x", x)
    batch, seq, heads, head_dim = x.shape
    if heads > 1 and x.stride(2) != head_dim:
        raise ValueError(f"{op}: x must hold its heads contiguously (stride {head_dim} over heads), "
                         f"got strides {x.stride()}")
    return batch * seq, heads * head_dim, x.stride(0), x.stride(1)


def quantize_fp8_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `quantize_fp8_tensor_reference`: e4m3 values (contiguous (B, S, H, D)) and float32 [descale, scale]."""
    op = "quantize_fp8_tensor"
    rows, width, stride_b, stride_s = _rows_of(op, x)
    check_launchable(op, _quantize_kernel, x=x)
    values = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(2, dtype=torch.float32, device=x.device)
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    if rows == 0:
        scales.copy_(torch.tensor([MIN_AMAX / E4M3_MAX, E4M3_MAX / MIN_AMAX]))
        return values, scales
    seq = x.shape[1]
    _amax_kernel[(rows,)](x, amax_bits, seq, width, stride_b, stride_s, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _quantize_kernel[(rows,)](x, amax_bits, values, scales, seq, width, stride_b, stride_s,
                              BLOCK=BLOCK, num_warps=NUM_WARPS)
    return values, scales


def dequantize_fp8_tensor(values: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fused `dequantize_fp8_tensor_reference` for contiguous e4m3 values and a one-element float32 descale."""
    op = "dequantize_fp8_tensor"
    if values.dtype != torch.float8_e4m3fn or not values.is_contiguous():
        raise ValueError(f"{op}: values must be contiguous float8_e4m3fn, got {values.dtype} "
                         f"with strides {values.stride()}")
    if descale.dtype != torch.float32 or descale.numel() != 1:
        raise ValueError(f"{op}: descale must be one float32 element, got {descale.dtype} of shape "
                         f"{tuple(descale.shape)}")
    check_launchable(op, _dequantize_kernel, values=values, descale=descale)
    out = torch.empty(values.shape, dtype=dtype, device=values.device)
    n = values.numel()
    if n:
        _dequantize_kernel[(triton.cdiv(n, BLOCK),)](values, descale, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
