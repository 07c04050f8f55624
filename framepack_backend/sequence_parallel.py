"""Sequence parallelism over attention heads (Ulysses), applied to a finished transformer.

    apply_sequence_parallel(transformer, group)   # beside FP8 and the fused kernels

P ranks, one device each, run the transformer blocks together on one forward. The split
plan, declared once here (`SPLIT_PLAN`), is:

- the latent stream ([4x, 2x, 1x clean context, noisy latents], with RoPE) is split by
  tokens: rank r holds a contiguous run of about n/P tokens and their RoPE rows through
  every block, and the shards are gathered after the last block. Linear layers, norms
  and MLPs of the latent stream therefore cost 1/P per rank: this is where the speed-up is.
- the context stream (729 SigLIP image tokens + at most 256 text tokens) is replicated:
  every rank holds all of it and runs its projections and MLPs. 729 + L tokens do not
  divide evenly over ranks, and at ~10 % of the 640-bucket sequence repeating them costs
  less than splitting them would cost in padding and an extra all-to-all per block.
- attention (`Attend.joint`, framepack_backend/attention.py) is the only exchange inside
  the blocks: an all-to-all turns this rank's latent tokens × all heads into all latent
  tokens × its H/P heads; the context's H/P heads are a slice (no communication); the
  backend runs one complete attention problem on [all latents | context] over H/P heads;
  a second all-to-all brings the latent output back to this rank's tokens × all heads,
  and the context output is all-gathered over heads, so every rank keeps an identical
  replica of the context stream.
- the embedders, TeaCache's signal and decision, the output norm and projection run on
  the full sequence before and after the split, unchanged (rank 0 decides; see
  sequence_group.py for how the other ranks learn the decision).

Token counts need not divide by P (shards differ by at most one token); the head count
must (24 for FramePack, `check_heads_divide`). A key mask is refused: batch 1 crops its
text instead, which is the only way the pipeline calls the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

SPLIT_PLAN = {
    "latents": "split by tokens over ranks (contiguous runs, sizes differ by at most 1), with their RoPE rows",
    "context": "replicated: 729 image + <=256 text tokens do not divide over ranks and cost little to repeat",
    "attention": "all-to-all latent tokens <-> heads; context heads sliced; context output all-gathered over heads",
    "output": "latent shards all-gathered after the last block; norm_out/proj_out on the full sequence",
}


def shard_sizes(tokens: int, ranks: int) -> list[int]:
    """How many of `tokens` consecutive tokens each rank holds: the first `tokens % ranks` one more."""
    base, extra = divmod(tokens, ranks)
    return [base + (rank < extra) for rank in range(ranks)]


def check_heads_divide(heads: int, ranks: int) -> None:
    """ValueError unless `ranks` divides the attention head count (each rank takes heads/ranks heads)."""
    if ranks < 1 or heads % ranks:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"sequence_parallel={ranks} is not allowed: it must divide the transformer's "
            f"{heads} attention heads ({', '.join(map(str, divisors))})"
        )


@dataclass(frozen=True)
class TokenShards:
    """A sequence-parallel process group and how one forward's latent tokens are split over it.

    `Attend.group` holds one during a sharded forward: the all-to-alls need every rank's
    token count, which only the split knows.
    """

    group: Any  # a torch.distributed ProcessGroup (None: the default group)
    sizes: tuple[int, ...]  # latent tokens per rank

    @property
    def ranks(self) -> int:
        return len(self.sizes)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def bounds(self) -> tuple[int, int]:
        start = sum(self.sizes[: self.rank])
        return start, start + self.sizes[self.rank]


def latents_to_heads(x: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    """This rank's tokens × all heads (B, n_r, H, D) -> all latent tokens × this rank's heads (B, n, H/P, D)."""
    batch, tokens, heads, dim = x.shape
    ranks = shards.ranks
    # all_to_all_single exchanges runs along dim 0: run j holds this rank's tokens for rank j's heads.
    send = x.reshape(batch, tokens, ranks, heads // ranks, dim).permute(2, 1, 0, 3, 4).contiguous()
    received = x.new_empty(sum(shards.sizes), batch, heads // ranks, dim)
    dist.all_to_all_single(received, send.flatten(0, 1), list(shards.sizes), [tokens] * ranks, group=shards.group)
    return received.permute(1, 0, 2, 3)


def heads_to_latents(y: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    """The inverse of `latents_to_heads`: (B, n, H/P, D) -> (B, n_r, H, D)."""
    batch, _, heads_here, dim = y.shape
    ranks, tokens = shards.ranks, shards.sizes[shards.rank]
    received = y.new_empty(ranks * tokens, batch, heads_here, dim)
    dist.all_to_all_single(received, y.permute(1, 0, 2, 3).contiguous(), [tokens] * ranks, list(shards.sizes),
                           group=shards.group)
    return received.view(ranks, tokens, batch, heads_here, dim).permute(2, 1, 0, 3, 4).reshape(
        batch, tokens, ranks * heads_here, dim)


def gather_heads(y: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    """Every rank's head shard (B, m, H/P, D) concatenated over heads -> (B, m, H, D)."""
    y = y.contiguous()
    parts = [torch.empty_like(y) for _ in range(shards.ranks)]
    dist.all_gather(parts, y, group=shards.group)
    return torch.cat(parts, dim=2)


def joint_over_heads(
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_latent: int, shards: TokenShards,
) -> torch.Tensor:
    """Ulysses attention on joint [this rank's latents | whole context] buffers (B, n_r + m, H, D).

    `run(q, k, v)` is the backend on one complete problem; returns (B, n_r + m, H, D) like
    unsplit attention would for these rows. A group of one rank holds every token and every
    head: its exchanges are the identity, so none runs (the degree-1 path costs what the
    plain path costs; benchmarks/multi_gpu.py overhead).
    """
    if shards.ranks == 1:
        return run(q, k, v)
    heads = q.shape[2] // shards.ranks
    mine = slice(shards.rank * heads, (shards.rank + 1) * heads)

    def rank_heads(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents_to_heads(x[:, :n_latent], shards), x[:, n_latent:, mine]], dim=1)

    out = run(rank_heads(q), rank_heads(k), rank_heads(v))
    n_all = sum(shards.sizes)
    return torch.cat([heads_to_latents(out[:, :n_all], shards), gather_heads(out[:, n_all:], shards)], dim=1)


def gather_tokens(x: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    """Every rank's latent shard (B, n_r, C) back in token order (B, n, C)."""
    if shards.ranks == 1:
        return x
    # all_gather wants equal sizes: pad the shorter shards by one token, then drop the padding.
    longest = max(shards.sizes)
    padded = x.new_zeros(x.shape[0], longest, x.shape[2])
    padded[:, : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(shards.ranks)]
    dist.all_gather(parts, padded, group=shards.group)
    return torch.cat([part[:, :size] for part, size in zip(parts, shards.sizes)], dim=1)


BlockStack = Callable[..., torch.Tensor]


class SequenceParallelBlocks:
    """The transformer's block stack run as one rank of a sequence-parallel group.

    Installed by `apply_sequence_parallel` as the transformer's `block_runner`; every rank
    calls it with the same full-sequence inputs (rank 0 from its forward; the other ranks
    from what rank 0 broadcast, sequence_group.py) and gets the full latent output back.
    `before_run` (rank 0 only) is called first with the inputs: that is where rank 0 sends
    them to the other ranks.
    """

    def __init__(self, run_stack: BlockStack, group: Any, ranks: int):
        self.run_stack = run_stack
        self.group = group
        self.ranks = ranks
        self.before_run: Callable[..., None] | None = None

    def __call__(self, latents, context, temb, rope, key_mask, attend):
        if key_mask is not None:
            raise ValueError("sequence parallelism takes no key mask: run batch 1, whose text is cropped instead")
        if self.before_run is not None:
            self.before_run(latents, context, temb, rope, attend)
        shards = TokenShards(self.group, tuple(shard_sizes(latents.shape[1], self.ranks)))
        start, end = shards.bounds()
        local_rope = type(rope)(*(table[start:end] for table in rope))
        out = self.run_stack(latents[:, start:end], context, temb, local_rope, None, attend.split_over(shards))
        return gather_tokens(out, shards)


def apply_sequence_parallel(transformer, group: Any, ranks: int | None = None) -> SequenceParallelBlocks:
    """Make `transformer` run its blocks as this process's rank of `group` (a torch.distributed group).

    From outside, like quantize_fp8 and the fused kernels: the blocks are unchanged; the
    transformer's `block_runner` becomes the split plan (module docstring). The group's
    size must divide the head count (ValueError). Returns the installed runner.
    """
    ranks = ranks if ranks is not None else dist.get_world_size(group)
    check_heads_divide(transformer.config.num_attention_heads, ranks)
    runner = SequenceParallelBlocks(transformer.run_block_stack, group, ranks)
    transformer.block_runner = runner
    return runner
