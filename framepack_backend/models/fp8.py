"""FP8 (e4m3) linear layers for Hopper: half the weight bytes, about twice the GEMM rate.

Weights are quantized once, with one scale per output channel; activations are
quantized per token on the fly, so an outlier token does not flatten the others.
Both scales go to `torch._scaled_mm` (row-wise scaling, Hopper and newer), which
accumulates in fp32 and writes bf16 with the bias added.

On CUDA the activation quantization is one Triton kernel (framepack_kernels/fp8_quantize.py), and
an input read by several layers (q, k, v and the MLP all read the same normalized
hidden state) can be quantized once and passed to each as an `Fp8Activation`.

This is an option (off by default): the error against bf16 is reported by
benchmarks/transformer_forward.py, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, k) -> (e4m3 values, fp32 scale per row (rows, 1)) with x ≈ values · scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


@dataclass(frozen=True)
class Fp8Activation:
    """An activation already quantized per row: values (rows, k) e4m3, scale (rows, 1) fp32."""

    values: torch.Tensor
    scale: torch.Tensor
    leading_shape: tuple[int, ...]  # the activation's shape without its last dimension
    dtype: torch.dtype  # what the layers fed by it return

    @classmethod
    def of_rows(cls, x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> Fp8Activation:
        """x (…, k) as its quantized rows: values (rows, k), scale (rows, 1)."""
        return cls(values, scale, tuple(x.shape[:-1]), x.dtype)


def quantize_activation(
    x: torch.Tensor, extra: torch.Tensor | None = None, gelu_x: bool = False, gelu_extra: bool = False
) -> Fp8Activation:
    """Quantize x (or the concatenation [x | extra]) per row, optionally through tanh-GELU."""
    if x.is_cuda:
        from framepack_kernels import quantize_fp8_rows

        values, scale = quantize_fp8_rows(x, extra, gelu_a=gelu_x, gelu_b=gelu_extra)
    else:
        from framepack_kernels.fp8_quantize import quantize_fp8_rows_reference

        values, scale = quantize_fp8_rows_reference(x, extra, gelu_a=gelu_x, gelu_b=gelu_extra)
    return Fp8Activation.of_rows(x, values, scale)


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight)  # (out, in) row-major; .t() is the column-major operand
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        q = x if isinstance(x, Fp8Activation) else quantize_activation(x)
        if q.values.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: input has {q.values.shape[-1]} features; this layer takes {self.in_features}")
        bias = None if self.bias is None else self.bias.to(q.dtype)
        out = torch._scaled_mm(
            q.values, self.weight.t(), scale_a=q.scale, scale_b=self.weight_scale, bias=bias, out_dtype=q.dtype
        )
        return out.reshape(*q.leading_shape, self.out_features)


def quantize_block_linears(blocks: list[nn.Module], skip: tuple[str, ...] = ("norm",)) -> int:
    """Replace the nn.Linear layers inside `blocks` with Fp8Linear, in place; returns how many.

    The AdaLN modulation projections (under `norm*`) act on one conditioning vector per
    sample: nothing to gain there, so they stay in bf16.
    """
    replaced = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear) and not full.split(".")[0].startswith(skip):
                    setattr(module, child_name, Fp8Linear(child))
                    replaced += 1
    return replaced
