"""The one attention dispatch point of the engine.

Layout: every backend takes and returns tensors shaped (batch, seq, heads, head_dim),
the order the q/k/v projections produce before any transpose. Flash-attention,
SageAttention and xformers use the same layout, and sequence parallelism shards it
over `heads` (an all-to-all swaps a sequence shard for a head shard), so new
backends plug in without a reshape in the model.

`key_mask` (batch, kv_seq) bool, True = attend, hides padded text tokens. It only
masks keys: padded query rows still produce values, which the model never reads.
With `key_mask=None` nothing is masked (batch 1 with text cropped to its length).
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from framepack_backend.settings import SettingsError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    run: AttentionFn
    is_available: Callable[[], bool]


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(name: str, run: AttentionFn, is_available: Callable[[], bool] = lambda: True) -> None:
    """Add a backend. `is_available` should be cheap (cache it): it is asked on every call."""
    _BACKENDS[name] = AttentionBackend(name, run, is_available)


def available_backends() -> list[str]:
    return sorted(name for name, backend in _BACKENDS.items() if backend.is_available())


def require_backend(name: str) -> AttentionBackend:
    """The backend called `name`, or a ValueError naming the ones that can run here."""
    backend = _BACKENDS.get(name)
    if backend is None or not backend.is_available():
        reason = "is not available on this machine" if backend is not None else "is unknown"
        raise ValueError(f"attention backend {name!r} {reason}; available: {', '.join(available_backends())}")
    return backend


# What "auto" picks on a GPU: the fastest *exact* backend, fastest first. "flash" is
# first only when flash-attn 3/4 is installed: on an H100 at the 640 bucket FA4 runs at
# 693 TFLOP/s, cuDNN at 550-670, torch's own flash kernel at 360
# (benchmarks/results/attention_*.json). "sage" quantizes q/k to int8 (about 1 % error),
# so "auto" never picks it.
AUTO_PREFERENCE = ("flash", "sdpa", "xformers")


def resolve_backend(requested: str, device: str | torch.device) -> str:
    """The backend name to use for the `attention` setting ("auto" or a backend name)."""
    if requested == "auto":
        if torch.device(device).type != "cuda":
            return "sdpa"
        available = available_backends()
        if "flash" in available and _flash_attn_interface() is None:
            available.remove("flash")
        return next(name for name in AUTO_PREFERENCE if name in available)
    if requested not in available_backends():
        allowed = ", ".join(["auto", *available_backends()])
        raise SettingsError("attention", requested, f"one of {allowed} on this machine")
    return requested


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim)) v over (batch, seq, heads, head_dim) tensors.

    Returns (batch, q_seq, heads, head_dim) in the dtype of `q`.
    """
    # Availability is checked when a backend is chosen (set_attention_backend), not here:
    # this runs 60 times per forward and inside compiled graphs.
    entry = _BACKENDS.get(backend)
    if entry is None:
        require_backend(backend)  # raises, listing the available backends
    return entry.run(q, k, v, key_mask)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    # SDPA wants (batch, heads, seq, head_dim); transposes are views, and the fused
    # kernels accept them because head_dim stays the contiguous axis.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@cache
def _sdpa_available() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


# ------------------------------------------------------------------ GPU backends
#
# Each is registered by name; `is_available` imports lazily and checks the GPU once,
# so a machine without the library just doesn't list the backend.


def _sdpa_priority() -> list:
    from torch.nn.attention import SDPBackend

    # cuDNN first: on Hopper its fused kernel runs at ~635 TFLOP/s in bf16, torch's flash ~360.
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH]


def _sdpa_cuda_first(q, k, v, key_mask):
    if not q.is_cuda or key_mask is not None or torch.compiler.is_compiling():
        return _sdpa(q, k, v, key_mask)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_priority(), set_priority=True):
        return _sdpa(q, k, v, None)


@cache
def _flash_attn_interface():
    """flash-attn 4 (CuTe DSL) or 3 (Hopper) if installed: their `flash_attn_func`."""
    for module in ("flash_attn.cute", "flash_attn_interface"):
        try:
            return __import__(module, fromlist=["flash_attn_func"]).flash_attn_func
        except Exception:  # noqa: BLE001 - any import failure means "not installed here"
            continue
    return None


def _flash(q, k, v, key_mask):
    if key_mask is not None:
        raise ValueError("attention backend 'flash' does not take a key mask; crop the text (batch 1) instead")
    func = _flash_attn_interface()
    if func is not None:
        out = func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return _sdpa(q, k, v, None)


@cache
def _cuda_half_precision() -> bool:
    return torch.cuda.is_available()


def _sage(q, k, v, key_mask):
    if key_mask is not None:
        raise ValueError("attention backend 'sage' does not take a key mask; crop the text (batch 1) instead")
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


@cache
def _sage_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import sageattention  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _xformers(q, k, v, key_mask):
    import xformers.ops as xops

    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
        bias = bias[:, None, None, :].expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


@cache
def _xformers_available() -> bool:
    """xformers imports even when its kernels were built for another torch; a tiny call tells."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        x = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(x, x, x)
    except Exception:  # noqa: BLE001 - "No operator found for memory_efficient_attention_forward" etc.
        return False
    return True


register_backend("sdpa", _sdpa_cuda_first, _sdpa_available)
register_backend("flash", _flash, _cuda_half_precision)
register_backend("sage", _sage, _sage_available)
register_backend("xformers", _xformers, _xformers_available)
