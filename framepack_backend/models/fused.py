"""The transformer blocks' forward on the fused Triton kernels (`framepack_kernels/`).

Same weights and the same mathematics as the blocks' own `forward` in transformer.py,
with the elementwise chains each done in one pass: AdaLN norm + modulation, q/k
RMSNorm + RoPE written straight into the joint [latents, context] q/k buffers (no
concatenation), and gated residual adds fused with the next modulated norm. Every
kernel computes in fp32 and rounds once, so results differ from the eager path only
by bf16 rounding. On CUDA the MLP's GELU runs in the GEMM epilogue and the single-stream
output projection reads attention and MLP outputs without concatenating them. The blocks
call these when `block.fused_kernels` is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framepack_kernels import (
    adaln_layernorm_modulate,
    adaln_layernorm_modulate_fp8,
    gated_residual,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    qk_rmsnorm_rope,
)

from ..attention import Attend
from .fp8 import Fp8Activation, Fp8Linear, quantize_activation
from .qkv import first_reader, project_qkv


def modulation(norm: torch.nn.Module, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The AdaNormZero's `chunks` (batch, dim) vectors: shift, scale, then the rest."""
    return norm.linear(F.silu(temb)).chunk(norm.chunks, dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def _is_plain_linear(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """An nn.Linear with a bias on a CUDA tensor: the GEMM-epilogue paths below apply.
    FP8 layers (models/fp8.py), CPU runs and layers with a forward hook (a job's LoRA,
    lora/apply.py, which these paths would bypass) take the plain path."""
    return type(layer) is torch.nn.Linear and layer.bias is not None and x.is_cuda and not layer._forward_hooks


def linear_gelu(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU(layer(x)) with the activation applied in cuBLASLt's GEMM epilogue, so the
    (tokens × 4·dim) MLP activation is written once instead of written, read and
    written again by a separate GELU pass. cuBLASLt's GELU epilogue is the tanh form."""
    if not _is_plain_linear(layer, x):
        return F.gelu(layer(x), approximate="tanh")
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(layer.bias, rows, layer.weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], layer.out_features)


def linear_of_concat(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """layer(cat([a, b], -1)) as two GEMMs accumulating into one output.

    The single-stream block's output projection reads [attention | MLP] (tokens × 5·dim);
    splitting the weight by columns (strided views, no copy) and accumulating the second
    product onto the first (beta = 1) never materialises that concatenation.
    """
    if not _is_plain_linear(layer, a):
        return layer(torch.cat([a, b], dim=-1))
    split = a.shape[-1]
    out = torch.addmm(layer.bias, a.reshape(-1, split), layer.weight[:, :split].t())
    out.addmm_(b.reshape(-1, b.shape[-1]), layer.weight[:, split:].t())
    return out.view(*a.shape[:-1], layer.out_features)


# Triton's CPU interpreter rounds float32 -> e4m3 its own way (see tests/test_kernels.py),
# so off CUDA an FP8 layer's input is quantized by quantize_activation's torch reference.


def modulated_input(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, reader: torch.nn.Module):
    """AdaLN(x) for the projections that read it; when they are FP8 layers it is quantized
    once for all of them, on CUDA by the norm kernel as it writes the rows."""
    fp8 = isinstance(reader, Fp8Linear)
    if fp8 and x.is_cuda:
        return Fp8Activation.of_rows(x, *adaln_layernorm_modulate_fp8(x, shift, scale))
    modulated = adaln_layernorm_modulate(x, shift, scale)
    return quantize_activation(modulated) if fp8 else modulated


def residual_and_modulated_input(x, y, gate, shift, scale, reader: torch.nn.Module):
    """x + y·gate (new), and AdaLN of it for `reader`, quantized as in `modulated_input`."""
    fp8 = isinstance(reader, Fp8Linear)
    if fp8 and x.is_cuda:
        residual, values, scales = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
        return residual, Fp8Activation.of_rows(x, values, scales)
    residual, modulated = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    return residual, quantize_activation(modulated) if fp8 else modulated


def feed_forward(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The blocks' FeedForward (Linear -> tanh-GELU -> Linear) with the GELU fused: into the
    first GEMM's epilogue (bf16), or into the quantization of the second GEMM's input (FP8)."""
    up, down = ff.net[0]["proj"], ff.net[2]
    if isinstance(down, Fp8Linear):
        return down(quantize_activation(up(x), gelu_x=True))
    return down(linear_gelu(up, x))


def dual_stream_forward(block, x, context, temb, rope, key_mask, attend: Attend):
    shift, scale, gate_attn, shift_ff, scale_ff, gate_ff = modulation(block.norm1, temb)
    c_shift, c_scale, c_gate_attn, c_shift_ff, c_scale_ff, c_gate_ff = modulation(block.norm1_context, temb)
    attn, heads = block.attn, block.attn.heads
    x_in = modulated_input(x, shift, scale, first_reader(attn))
    c_in = modulated_input(context, c_shift, c_scale, first_reader(attn, "add_qkv_proj"))
    x_q, x_k, x_v = project_qkv(attn, x_in)
    c_q, c_k, c_v = project_qkv(attn, c_in, "add_qkv_proj")

    n, m = x.shape[1], context.shape[1]
    head_dim = x.shape[2] // heads
    q = x.new_empty(x.shape[0], n + m, heads, head_dim)
    k = torch.empty_like(q)
    qk_rmsnorm_rope(_heads(x_q, heads), attn.norm_q.weight, rope.cos, rope.sin, out=q[:, :n])
    qk_rmsnorm_rope(_heads(x_k, heads), attn.norm_k.weight, rope.cos, rope.sin, out=k[:, :n])
    qk_rmsnorm_rope(_heads(c_q, heads), attn.norm_added_q.weight, None, None, out=q[:, n:])
    qk_rmsnorm_rope(_heads(c_k, heads), attn.norm_added_k.weight, None, None, out=k[:, n:])
    v = torch.cat([_heads(x_v, heads), _heads(c_v, heads)], dim=1)
    # The joint buffers go to the seam whole; `n` marks where the latents end.
    out = attend.joint(q, k, v, n, key_mask).flatten(2)

    x, ff_in = residual_and_modulated_input(
        x, attn.to_out[0](out[:, :n]), gate_attn, shift_ff, scale_ff, block.ff.net[0]["proj"]
    )
    x = gated_residual(x, feed_forward(block.ff, ff_in), gate_ff, out=x)
    context, c_ff_in = residual_and_modulated_input(
        context, attn.to_add_out(out[:, n:]), c_gate_attn, c_shift_ff, c_scale_ff, block.ff_context.net[0]["proj"]
    )
    context = gated_residual(context, feed_forward(block.ff_context, c_ff_in), c_gate_ff, out=context)
    return x, context


def single_stream_forward(block, x, temb, n_latent, rope, key_mask, attend: Attend):
    shift, scale, gate = modulation(block.norm, temb)
    attn, heads = block.attn, block.attn.heads
    fp8 = isinstance(block.proj_out, Fp8Linear)
    x_in = modulated_input(x, shift, scale, first_reader(attn))
    # FP8: the GELU is applied while quantizing [attention | MLP] for the output projection.
    mlp = block.proj_mlp(x_in) if fp8 else linear_gelu(block.proj_mlp, x_in)

    x_q, x_k, x_v = project_qkv(attn, x_in)
    q = qk_rmsnorm_rope(_heads(x_q, heads), attn.norm_q.weight, rope.cos, rope.sin, rope_tokens=n_latent)
    k = qk_rmsnorm_rope(_heads(x_k, heads), attn.norm_k.weight, rope.cos, rope.sin, rope_tokens=n_latent)
    out = attend.joint(q, k, _heads(x_v, heads), n_latent, key_mask).flatten(2)
    if fp8:
        projected = block.proj_out(quantize_activation(out, mlp, gelu_extra=True))
    else:
        projected = linear_of_concat(block.proj_out, out, mlp)
    return gated_residual(x, projected, gate)
