"""The one attention dispatch point of the engine.

Layout: every backend takes and returns tensors shaped (batch, seq, heads, head_dim),
the order the q/k/v projections produce before any transpose. Flash-attention,
SageAttention and xformers use the same layout, and sequence parallelism shards it
over `heads` (an all-to-all swaps a sequence shard for a head shard), so new
backends plug in without a reshape in the model.

`key_mask` (batch, kv_seq) bool, True = attend, hides padded text tokens. It only
masks keys: padded query rows still produce values, which the model never reads.
With `key_mask=None` nothing is masked (batch 1 with text cropped to its length).

Backends declare what they can do where they register (`register_backend`): exact or
not, key mask or not, whether they can be split for sequence parallelism, the device
types they run on and their place in `auto`'s preference. `auto` is a query over the
registry (`choose_backend`): the most preferred exact backend available here that
supports the call. `BACKEND_NAMES` are the registered names; the `attention` setting
takes its choices from them.

A job binds its choice once, as an `Attend`, and hands it to the transformer's
forward, which hands it to every block: nothing under `models/` names a backend.

The joint-attention seam. Every block attention in the model is one call,
`attend.joint(q, k, v, n_latent, key_mask)`, on joint buffers whose first `n_latent`
tokens are the latent stream ([4x, 2x, 1x clean context, noisy latents], RoPE) and
whose remaining tokens are the context stream (729 SigLIP image tokens and at most 256
text tokens). The eager and fused dual-stream blocks and the eager and fused
single-stream blocks all call it. The fused dual-stream forward writes q and k straight
into the joint buffers, so the seam costs no copy: the split point travels as an
integer, not as separate tensors. The text refiner's attention (text tokens only, before
the blocks) is `attend.local(...)` and is never split.

Sequence parallelism over heads (Ulysses) uses `Attend.group`, a
`sequence_parallel.TokenShards` set for one sharded forward (`split_over`). Each of the
P ranks then holds about 1/P of the latent tokens and the whole context, replicated:
729 + ≤256 tokens do not divide evenly over ranks and cost little to repeat. `joint`
  1. all-to-alls the latent part `q/k/v[:, :n_latent]`, (B, n/P, H, D) -> (B, n, H/P, D);
  2. takes this rank's H/P heads of the context part, a slice: no communication;
  3. runs the backend on [latents | context] over those H/P heads, a complete attention
     problem, which is why every backend taking (batch, seq, heads, head_dim) can be split;
  4. all-to-alls the latent output back to (B, n/P, H, D) and all-gathers the heads of
     the context output, which every rank needs whole.
A key mask is refused there (batch 1 crops its text). The split plan as a whole is in
framepack_backend/sequence_parallel.py.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _always() -> bool:
    return True


@dataclass(frozen=True)
class AttentionBackend:
    """A registered attention kernel and what it can do.

    exact: softmax attention to the rounding of the input dtype (SageAttention
      quantizes q and k to int8, about 1 % error: not exact).
    key_mask: takes a key mask; without one the text must be cropped (batch 1).
    sequence_parallel: can run on a head shard after a sequence-to-head all-to-all.
    devices: the device types it runs on ("cpu", "cuda").
    dtypes: the input dtypes it takes; None: any.
    auto_rank: its place in `auto`'s preference, 0 first; None: `auto` never picks it.
    auto_if: a further condition for `auto` to pick it (checked after availability).
    """

    name: str
    run: AttentionFn
    is_available: Callable[[], bool]
    exact: bool
    key_mask: bool
    sequence_parallel: bool
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    auto_rank: int | None = None
    auto_if: Callable[[], bool] = _always

    def supports(
        self, device: str | torch.device, dtype: torch.dtype | None = None, key_mask: bool = False,
        sequence_parallel: bool = False,
    ) -> bool:
        """Whether a call with these properties can run on this backend (availability aside)."""
        return (torch.device(device).type in self.devices
                and (dtype is None or self.dtypes is None or dtype in self.dtypes)
                and (self.key_mask or not key_mask)
                and (self.sequence_parallel or not sequence_parallel))


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(
    name: str,
    run: AttentionFn,
    is_available: Callable[[], bool] = _always,
    *,
    exact: bool,
    key_mask: bool,
    sequence_parallel: bool,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...] | None = None,
    auto_rank: int | None = None,
    auto_if: Callable[[], bool] = _always,
) -> AttentionBackend:
    """Add a backend with its capabilities (see AttentionBackend).

    `is_available` should be cheap (cache it): it is asked whenever a backend is chosen.
    """
    backend = AttentionBackend(name, run, is_available, exact, key_mask, sequence_parallel, tuple(devices),
                               None if dtypes is None else tuple(dtypes), auto_rank, auto_if)
    _BACKENDS[name] = backend
    return backend


def available_backends() -> list[str]:
    return sorted(name for name, backend in _BACKENDS.items() if backend.is_available())


def require_backend(name: str) -> AttentionBackend:
    """The backend called `name`, or a ValueError naming the ones that can run here."""
    backend = _BACKENDS.get(name)
    if backend is None or not backend.is_available():
        reason = "is not available on this machine" if backend is not None else "is unknown"
        raise ValueError(f"attention backend {name!r} {reason}; available: {', '.join(available_backends())}")
    return backend


def choose_backend(
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    key_mask: bool = False,
    sequence_parallel: bool = False,
) -> AttentionBackend:
    """What `auto` means: the most preferred exact backend available here that supports the call."""
    candidates = [
        backend for backend in _BACKENDS.values()
        if backend.exact and backend.auto_rank is not None
        and backend.supports(device, dtype, key_mask, sequence_parallel)
        and backend.is_available() and backend.auto_if()
    ]
    if not candidates:
        call = f"device {torch.device(device).type}, dtype {dtype}, key_mask {key_mask}, " \
               f"sequence_parallel {sequence_parallel}"
        raise ValueError(f"no exact attention backend supports this call ({call}); "
                         f"available: {', '.join(available_backends())}")
    return min(candidates, key=lambda backend: backend.auto_rank)


def resolve_backend(requested: str, device: str | torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend name to use for the `attention` setting ("auto" or a backend name)."""
    from framepack_backend.settings import SettingsError  # settings reads BACKEND_NAMES from here

    if requested == "auto":
        return choose_backend(device, dtype).name
    usable = [name for name in available_backends() if _BACKENDS[name].supports(device, dtype)]
    if requested not in usable:
        raise SettingsError("attention", requested, f"one of {', '.join(['auto', *usable])} on this machine")
    return requested


@dataclass(frozen=True)
class Attend:
    """Attention bound for one job: the chosen backend and, in a sequence-parallel forward, its group.

    Built once per job (`for_setting`, `named`, `default`) and passed to the
    transformer's forward, which hands it to every block. `local` is plain attention;
    `joint` is the seam every block attention goes through, given joint
    [latent | context] buffers and the number of latent tokens (module docstring).

    `group` is None, or a `sequence_parallel.TokenShards` (the process group and each
    rank's latent token count) bound by `split_over` for one sharded forward: `joint`
    then exchanges only the first `n_latent` tokens over it and keeps the context
    replicated.
    """

    backend: AttentionBackend
    group: Any = None

    def __post_init__(self) -> None:
        if self.group is not None and not self.backend.sequence_parallel:
            raise ValueError(f"attention backend {self.backend.name!r} cannot be split for sequence parallelism")

    @classmethod
    def named(cls, name: str, group: Any = None) -> "Attend":
        """Bound to the backend called `name` (a ValueError lists the available ones)."""
        return cls(require_backend(name), group)

    @classmethod
    def default(
        cls, device: str | torch.device, dtype: torch.dtype | None = None, key_mask: bool = False
    ) -> "Attend":
        """The `auto` choice for a call on `device` (sdpa on a CPU)."""
        return cls(choose_backend(device, dtype, key_mask))

    @classmethod
    def for_setting(
        cls, requested: str, device: str | torch.device, dtype: torch.dtype | None = None
    ) -> "Attend":
        """For the `attention` setting ("auto" or a name); SettingsError if it cannot run here."""
        return cls.named(resolve_backend(requested, device, dtype))

    @property
    def name(self) -> str:
        return self.backend.name

    def split_over(self, shards: Any) -> "Attend":
        """This attention for one rank of a sequence-parallel forward (a sequence_parallel.TokenShards)."""
        return Attend(self.backend, shards)

    def local(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(head_dim)) v over (batch, seq, heads, head_dim) tensors, on this rank only.

        Returns (batch, q_seq, heads, head_dim) in the dtype of `q`.
        """
        # Availability was checked when the backend was bound, not here: this runs 60 times
        # per forward and inside compiled graphs.
        if key_mask is not None and not self.backend.key_mask:
            raise ValueError(
                f"attention backend {self.backend.name!r} does not take a key mask; crop the text (batch 1) instead"
            )
        return self.backend.run(q, k, v, key_mask)

    def joint(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_latent: int,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over joint [latent | context] buffers whose first `n_latent` tokens are latents.

        Same result as `local`; with a sequence-parallel group the latent part is this
        rank's shard, exchanged over the group (module docstring).
        """
        if self.group is None:
            return self.local(q, k, v, key_mask)
        if key_mask is not None:
            raise ValueError("sequence-parallel attention takes no key mask; crop the text (batch 1) instead")
        from .sequence_parallel import joint_over_heads  # it imports torch.distributed

        return joint_over_heads(lambda q, k, v: self.backend.run(q, k, v, None), q, k, v, n_latent, self.group)


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
    if not q.is_cuda or key_mask is not None:
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


def _flash_attn_installed() -> bool:
    return _flash_attn_interface() is not None


def _flash(q, k, v, key_mask):
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


def _cudnn_fp8(q, k, v, key_mask):
    from .cudnn_fp8_attention import cudnn_fp8_attention

    return cudnn_fp8_attention(q, k, v)


def _cudnn_fp8_available() -> bool:
    from .cudnn_fp8_attention import cudnn_fp8_available

    return cudnn_fp8_available()


# ------------------------------------------------------------------ the registry
#
# `auto_rank` is the order "auto" tries on a GPU, fastest first: "flash" leads only
# when flash-attn 3/4 is installed (on an H100 at the 640 bucket FA4 runs at 693
# TFLOP/s, cuDNN at 550-670, torch's own flash kernel, flash's fallback, at 360;
# benchmarks/results/attention_*.json). "sage" and "cudnn-fp8" (FP8 attention, Hopper and
# newer) have no rank: they are inexact, chosen by name only. Every backend takes
# (batch, seq, heads, head_dim), so every one can run on a head shard.

HALF = (torch.float16, torch.bfloat16)

register_backend("sdpa", _sdpa_cuda_first, _sdpa_available, exact=True, key_mask=True, sequence_parallel=True,
                 devices=("cpu", "cuda"), auto_rank=1)
register_backend("flash", _flash, _cuda_half_precision, exact=True, key_mask=False, sequence_parallel=True,
                 devices=("cuda",), dtypes=HALF, auto_rank=0, auto_if=_flash_attn_installed)
register_backend("sage", _sage, _sage_available, exact=False, key_mask=False, sequence_parallel=True,
                 devices=("cuda",), dtypes=HALF)
register_backend("xformers", _xformers, _xformers_available, exact=True, key_mask=True, sequence_parallel=True,
                 devices=("cuda",), dtypes=(*HALF, torch.float32), auto_rank=2)
register_backend("cudnn-fp8", _cudnn_fp8, _cudnn_fp8_available, exact=False, key_mask=False, sequence_parallel=True,
                 devices=("cuda",), dtypes=HALF)

# The built-in backends' names, in registration order: the `attention` setting's choices besides "auto".
BACKEND_NAMES = tuple(_BACKENDS)
