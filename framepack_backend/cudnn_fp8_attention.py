"""FP8 attention on Hopper and newer: cuDNN's fused FP8 flash attention (the `cudnn-fp8` backend).

Opt-in and not exact: about twice the tensor-core rate of bf16 attention, at the cost
of e4m3 rounding of q, k, v, the probabilities and the output (its error against bf16,
per forward and after a whole section, is measured by benchmarks/fp8_attention.py).

The arithmetic:
- q, k and v are quantized per tensor on the GPU (framepack_kernels/fp8_tensor.py): each
  comes with a descale, amax / 448, that cuDNN multiplies back in float32.
- cuDNN forms q·kᵀ, runs the online softmax in float32 and quantizes the unnormalized
  probabilities, each at most 1, with the fixed scale 448 (descale 1/448).
- On Hopper the output must be e4m3 too. It is a convex combination of v's rows, so
  |o| ≤ amax|v|: stored with v's own scale it cannot overflow, and v's descale turns it
  back into q's dtype in one pass.

Nothing waits on the host: the scales are GPU tensors handed to cuDNN by address. The
library is NVIDIA's `nvidia-cudnn-frontend` (the `fp8-attention` extra) over the
cuDNN that torch already loaded; a graph is built once per device and shape and kept
(a job has a handful of shapes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# FP8 SDPA forward on Hopper arrived in cuDNN 9.1.
MIN_CUDNN_VERSION = 90100
# Graphs kept per process: a job uses one or two shapes; a server sees a few buckets.
MAX_GRAPHS = 16


@cache
def cudnn_fp8_available() -> bool:
    """A Hopper-or-newer GPU, the cuDNN frontend installed and a cuDNN backend that has FP8 attention."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    try:
        import cudnn  # the nvidia-cudnn-frontend package
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return False
    return int(cudnn.backend_version()) >= MIN_CUDNN_VERSION


@dataclass
class _Plan:
    """A built cuDNN graph for one shape, its tensor handles and the buffers it owns."""

    graph: Any
    handle: Any
    tensors: dict[str, Any]
    workspace: torch.Tensor
    amax: torch.Tensor  # cuDNN's amax outputs (of the probabilities and the output), unused
    constants: torch.Tensor  # [descale_s, scale_s] = [1/448, 448]


_lock = threading.Lock()
_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_handles: dict[int, Any] = {}


def _handle(device: torch.device) -> Any:
    import cudnn

    if device.index not in _handles:
        with torch.cuda.device(device):
            _handles[device.index] = cudnn.create_handle()
    return _handles[device.index]


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _bhsd(batch: int, seq: int, heads: int, head_dim: int) -> tuple[list[int], list[int]]:
    """cuDNN's (batch, heads, seq, head_dim) dims over memory laid out (batch, seq, heads, head_dim)."""
    return [batch, heads, seq, head_dim], [seq * heads * head_dim, head_dim, heads * head_dim, 1]


def _build(device: torch.device, batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int) -> _Plan:
    import cudnn

    handle = _handle(device)
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    t: dict[str, Any] = {}
    for name, seq in (("q", seq_q), ("k", seq_kv), ("v", seq_kv)):
        dim, stride = _bhsd(batch, seq, heads, head_dim)
        t[name] = graph.tensor(name=name, dim=dim, stride=stride, data_type=e4m3)
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"],
        descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
        descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        generate_stats=False, attn_scale=head_dim**-0.5, use_causal_mask=False, name="attention",
    )
    scalar = ([1, 1, 1, 1], [1, 1, 1, 1])
    outputs = {"o": (o, _bhsd(batch, seq_q, heads, head_dim), e4m3),
               "amax_s": (amax_s, scalar, f32), "amax_o": (amax_o, scalar, f32)}
    for name, (tensor, (dim, stride), dtype) in outputs.items():
        tensor.set_output(True).set_dim(dim).set_stride(stride)
        tensor.set_data_type(dtype)
        t[name] = tensor
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
    amax = torch.zeros(2, dtype=torch.float32, device=device)
    constants = torch.tensor([1 / E4M3_MAX, E4M3_MAX], dtype=torch.float32, device=device)
    return _Plan(graph, handle, t, workspace, amax, constants)


def _plan(device: torch.device, *shape: int) -> _Plan:
    key = (device.index, *shape)
    with _lock:
        plan = _plans.get(key)
        if plan is None:
            try:
                plan = _plans[key] = _build(device, *shape)
            except Exception as e:  # cuDNN says why in its own words; say what was asked of it
                raise RuntimeError(f"cudnn-fp8 attention has no kernel for batch, heads, q length, kv length, "
                                   f"head_dim {shape} on {device}: {e}") from e
            while len(_plans) > MAX_GRAPHS:
                _plans.popitem(last=False)
        else:
            _plans.move_to_end(key)
        return plan


def _heads_together(x: torch.Tensor) -> torch.Tensor:
    """x itself if its heads and head_dim are one contiguous run per token (the quantizer's layout), else a copy."""
    if x.stride(-1) == 1 and (x.shape[2] == 1 or x.stride(2) == x.shape[3]):
        return x
    return x.contiguous()


def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim)) v in FP8, over (batch, seq, heads, head_dim); returns q's dtype and shape."""
    import cudnn

    if q.is_cuda:
        from framepack_kernels import dequantize_fp8_tensor, quantize_fp8_tensor
    else:  # the same arithmetic in torch (tests run the wiring on a CPU)
        from framepack_kernels.fp8_tensor import dequantize_fp8_tensor_reference as dequantize_fp8_tensor
        from framepack_kernels.fp8_tensor import quantize_fp8_tensor_reference as quantize_fp8_tensor

    batch, seq_q, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"cudnn-fp8 attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
                         f"must share batch, heads and head_dim, and k and v their length")
    (q8, q_scales), (k8, k_scales), (v8, v_scales) = (quantize_fp8_tensor(_heads_together(x)) for x in (q, k, v))
    plan = _plan(q.device, batch, heads, seq_q, k.shape[1], head_dim)
    out = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
    t = plan.tensors
    buffers = {
        t["q"]: q8, t["k"]: k8, t["v"]: v8,
        t["descale_q"]: q_scales[0:1], t["descale_k"]: k_scales[0:1], t["descale_v"]: v_scales[0:1],
        t["descale_s"]: plan.constants[0:1], t["scale_s"]: plan.constants[1:2],
        # The output keeps v's scale (module docstring): o8 = o · 448 / amax|v|.
        t["scale_o"]: v_scales[1:2],
        t["o"]: out, t["amax_s"]: plan.amax[0:1], t["amax_o"]: plan.amax[1:2],
    }
    cudnn.set_stream(handle=plan.handle, stream=_current_stream(q.device))
    plan.graph.execute(buffers, plan.workspace, handle=plan.handle)
    return dequantize_fp8_tensor(out, v_scales[0:1], q.dtype)
