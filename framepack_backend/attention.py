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


# What "auto" picks on a GPU, fastest first; on a CPU only "sdpa" makes sense.
AUTO_PREFERENCE = ("flash", "sage", "xformers", "sdpa")


def resolve_backend(requested: str, device: str | torch.device) -> str:
    """The backend name to use for the `attention` setting ("auto" or a backend name)."""
    if requested == "auto":
        if torch.device(device).type != "cuda":
            return "sdpa"
        available = available_backends()
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
    return require_backend(backend).run(q, k, v, key_mask)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    # SDPA wants (batch, heads, seq, head_dim); transposes are views, and the fused
    # kernels accept them because head_dim stays the contiguous axis.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@cache
def _sdpa_available() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


register_backend("sdpa", _sdpa, _sdpa_available)
