"""Triton-language GPU kernels for the FramePack transformer's elementwise work and the VAE decoder's norms.

Each kernel has a pure-torch `*_reference` with the same semantics (float32
arithmetic, one rounding to the input dtype). The kernels run on CUDA tensors, or on
CPU tensors when TRITON_INTERPRET=1 is set before this package is imported.
"""

from framepack_kernels.adaln_norm import (
    adaln_layernorm_modulate,
    adaln_layernorm_modulate_fp8,
    adaln_layernorm_modulate_fp8_reference,
    adaln_layernorm_modulate_reference,
)
from framepack_kernels.fp8_quantize import quantize_fp8_rows, quantize_fp8_rows_reference
from framepack_kernels.fp8_tensor import (
    dequantize_fp8_tensor,
    dequantize_fp8_tensor_reference,
    quantize_fp8_tensor,
    quantize_fp8_tensor_reference,
)
from framepack_kernels.gated_residual import gated_residual, gated_residual_reference
from framepack_kernels.gated_residual_norm import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    gated_residual_layernorm_modulate_fp8_reference,
    gated_residual_layernorm_modulate_reference,
)
from framepack_kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference
from framepack_kernels.qk_norm_rope import qk_rmsnorm_rope, qk_rmsnorm_rope_reference
from framepack_kernels.teacache_distance import (
    teacache_accumulate,
    teacache_accumulate_reference,
    teacache_relative_l1,
    teacache_relative_l1_reference,
)

__all__ = [
    "adaln_layernorm_modulate",
    "adaln_layernorm_modulate_fp8",
    "adaln_layernorm_modulate_fp8_reference",
    "adaln_layernorm_modulate_reference",
    "dequantize_fp8_tensor",
    "dequantize_fp8_tensor_reference",
    "gated_residual",
    "gated_residual_reference",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_fp8",
    "gated_residual_layernorm_modulate_fp8_reference",
    "gated_residual_layernorm_modulate_reference",
    "group_norm_silu",
    "group_norm_silu_reference",
    "quantize_fp8_rows",
    "quantize_fp8_rows_reference",
    "quantize_fp8_tensor",
    "quantize_fp8_tensor_reference",
    "qk_rmsnorm_rope",
    "qk_rmsnorm_rope_reference",
    "teacache_accumulate",
    "teacache_accumulate_reference",
    "teacache_relative_l1",
    "teacache_relative_l1_reference",
]
