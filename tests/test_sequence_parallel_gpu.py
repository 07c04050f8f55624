"""Sequence parallelism on one GPU over NCCL: a group of one rank must be the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from framepack_backend.attention import Attend
from framepack_backend.models.transformer import FramePackTransformer
from framepack_backend.sequence_parallel import (
    TokenShards,
    apply_sequence_parallel,
    heads_to_latents,
    latents_to_heads,
)
from framepack_server.server import free_ports

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_group_of_one():
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}", rank=0, world_size=1,
                            device_id=device)
    yield device
    dist.destroy_process_group()


def test_the_all_to_all_on_nccl_with_one_rank_is_the_identity_and_attention_is_unchanged(nccl_group_of_one):
    device = nccl_group_of_one
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 300 + 40, 24, 128, generator=g, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    shards = TokenShards(None, (300,))
    heads = latents_to_heads(q[:, :300], shards)
    assert torch.equal(heads, q[:, :300]) and torch.equal(heads_to_latents(heads, shards), q[:, :300])
    attend = Attend.named("sdpa")
    whole = attend.local(q, k, v)
    split = attend.split_over(shards).joint(q, k, v, 300)
    assert split.shape == whole.shape and (split.float() - whole.float()).abs().max().item() < 1e-2


def test_the_sequence_parallel_forward_at_degree_one_matches_the_plain_forward(nccl_group_of_one, tiny_bundle):
    device = nccl_group_of_one
    model = FramePackTransformer.from_pretrained(tiny_bundle / "transformer", dtype=torch.bfloat16, device=device)
    cfg = model.config
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    inputs = dict(
        hidden_states=rnd(1, cfg.in_channels, 3, 8, 10), timestep=rnd(1).fill_(700.0),
        encoder_hidden_states=rnd(1, 7, cfg.text_embed_dim), encoder_attention_mask=None,
        pooled_projections=rnd(1, cfg.pooled_projection_dim), image_embeds=rnd(1, 9, cfg.image_proj_dim),
        indices_latents=torch.arange(3, 6, device=device), guidance=rnd(1).fill_(10000.0),
    )
    with torch.inference_mode():
        plain = model(**inputs)
        apply_sequence_parallel(model, None, 1)
        split = model(**inputs)
    assert split.shape == plain.shape and torch.equal(split, plain)
