"""The transformer blocks' forward on the fused Triton kernels (`kernels/`).

Same weights and the same mathematics as the blocks' own `forward` in transformer.py,
with the elementwise chains each done in one pass: AdaLN norm + modulation, q/k
RMSNorm + RoPE written straight into the joint [latents, context] q/k buffers (no
concatenation), and gated residual adds fused with the next modulated norm. Every
kernel computes in fp32 and rounds once, so results differ from the eager path only
by bf16 rounding. The blocks call these when `block.fused_kernels` is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import adaln_layernorm_modulate, gated_residual, gated_residual_layernorm_modulate, qk_rmsnorm_rope

from ..attention import attention


def modulation(norm: torch.nn.Module, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The AdaNormZero's `chunks` (batch, dim) vectors: shift, scale, then the rest."""
    return norm.linear(F.silu(temb)).chunk(norm.chunks, dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def dual_stream_forward(block, x, context, temb, rope, key_mask, backend):
    shift, scale, gate_attn, shift_ff, scale_ff, gate_ff = modulation(block.norm1, temb)
    c_shift, c_scale, c_gate_attn, c_shift_ff, c_scale_ff, c_gate_ff = modulation(block.norm1_context, temb)
    x_in = adaln_layernorm_modulate(x, shift, scale)
    c_in = adaln_layernorm_modulate(context, c_shift, c_scale)

    attn, heads = block.attn, block.attn.heads
    n, m = x.shape[1], context.shape[1]
    head_dim = x.shape[2] // heads
    q = x.new_empty(x.shape[0], n + m, heads, head_dim)
    k = torch.empty_like(q)
    qk_rmsnorm_rope(_heads(attn.to_q(x_in), heads), attn.norm_q.weight, rope.cos, rope.sin, out=q[:, :n])
    qk_rmsnorm_rope(_heads(attn.to_k(x_in), heads), attn.norm_k.weight, rope.cos, rope.sin, out=k[:, :n])
    qk_rmsnorm_rope(_heads(attn.add_q_proj(c_in), heads), attn.norm_added_q.weight, None, None, out=q[:, n:])
    qk_rmsnorm_rope(_heads(attn.add_k_proj(c_in), heads), attn.norm_added_k.weight, None, None, out=k[:, n:])
    v = torch.cat([_heads(attn.to_v(x_in), heads), _heads(attn.add_v_proj(c_in), heads)], dim=1)
    out = attention(q, k, v, backend, key_mask).flatten(2)

    x, ff_in = gated_residual_layernorm_modulate(x, attn.to_out[0](out[:, :n]), gate_attn, shift_ff, scale_ff)
    x = gated_residual(x, block.ff(ff_in), gate_ff, out=x)
    context, c_ff_in = gated_residual_layernorm_modulate(
        context, attn.to_add_out(out[:, n:]), c_gate_attn, c_shift_ff, c_scale_ff
    )
    context = gated_residual(context, block.ff_context(c_ff_in), c_gate_ff, out=context)
    return x, context


def single_stream_forward(block, x, temb, n_latent, rope, key_mask, backend):
    shift, scale, gate = modulation(block.norm, temb)
    x_in = adaln_layernorm_modulate(x, shift, scale)
    mlp = F.gelu(block.proj_mlp(x_in), approximate="tanh")

    attn, heads = block.attn, block.attn.heads
    q = qk_rmsnorm_rope(_heads(attn.to_q(x_in), heads), attn.norm_q.weight, rope.cos, rope.sin, rope_tokens=n_latent)
    k = qk_rmsnorm_rope(_heads(attn.to_k(x_in), heads), attn.norm_k.weight, rope.cos, rope.sin, rope_tokens=n_latent)
    out = attention(q, k, _heads(attn.to_v(x_in), heads), backend, key_mask).flatten(2)
    return gated_residual(x, block.proj_out(torch.cat([out, mlp], dim=-1)), gate)
