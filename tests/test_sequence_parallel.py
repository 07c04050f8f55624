"""Sequence parallelism (Ulysses) on the CPU over gloo: the all-to-all attention against unsplit
attention, one forward against the plain forward, whole videos against the single-process
pipeline, and a worker killed mid-job."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framepack_backend.attention import Attend
from framepack_backend.events import GenerationResult, StepProgress
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.sequence_group import SequenceParallelError
from framepack_backend.sequence_parallel import (
    SPLIT_PLAN,
    TokenShards,
    check_heads_divide,
    shard_sizes,
)
from framepack_server.server import free_ports

FAST = {"resolution": 128, "steps": 4}
request = GenerationRequest.parse


def test_shards_cover_the_tokens_in_order_and_differ_by_at_most_one():
    for tokens in range(0, 40):
        for ranks in (1, 2, 3, 4, 8):
            sizes = shard_sizes(tokens, ranks)
            assert sum(sizes) == tokens and len(sizes) == ranks and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)


def test_the_group_size_must_divide_the_heads():
    for ranks in (1, 2, 3, 4, 6, 8, 12, 24):
        check_heads_divide(24, ranks)
    with pytest.raises(ValueError, match=r"sequence_parallel=5 is not allowed: .* 24 attention heads \(1, 2, 3, 4, "):
        check_heads_divide(24, 5)
    assert set(SPLIT_PLAN) == {"latents", "context", "attention", "output"}


def test_the_tiny_model_has_two_heads_so_three_ranks_are_refused_before_any_process_starts(tiny_bundle):
    with pytest.raises(ValueError, match=r"sequence_parallel=3 is not allowed: .* 2 attention heads \(1, 2\)"):
        Pipeline.from_pretrained(tiny_bundle, device="cpu", sequence_parallel=3)
    assert not dist.is_initialized()


def _attention_rank(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    n, m, heads, dim = 11, 5, 6, 8  # 11 latent tokens: uneven shards
    q, k, v = (torch.randn(2, n + m, heads, dim, generator=g) for _ in range(3))
    attend = Attend.named("sdpa")
    whole = attend.local(q, k, v)
    shards = TokenShards(None, tuple(shard_sizes(n, world)))
    start, end = shards.bounds()

    def mine(x):
        return torch.cat([x[:, start:end], x[:, n:]], dim=1)

    out = attend.split_over(shards).joint(mine(q), mine(k), mine(v), end - start)
    results.put((rank, tuple(out.shape), (out - mine(whole)).abs().max().item()))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_joint_attention_equals_unsplit_attention_on_each_rank_s_rows(world):
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_ports(1)[0]
    ranks = [context.Process(target=_attention_rank, args=(r, world, port, results)) for r in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    found = sorted(results.get(timeout=5) for _ in range(world))
    sizes = shard_sizes(11, world)
    assert [shape for _, shape, _ in found] == [(2, size + 5, 6, 8) for size in sizes]
    assert max(error for *_, error in found) < 1e-6


# ------------------------------------------------------------------ whole pipelines, two ranks

_open: dict[str, Pipeline] = {}


def sequence_parallel_pipeline(tiny_bundle, sampling: str) -> Pipeline:
    """A pipeline over two ranks; one at a time, since a process joins one torch.distributed group."""
    if sampling not in _open:
        for other in _open.values():
            other.close()
        _open.clear()
        _open[sampling] = Pipeline.from_pretrained(tiny_bundle, device="cpu", sampling=sampling, sequence_parallel=2)
    return _open[sampling]


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    for pipeline in _open.values():
        pipeline.close()
    _open.clear()


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    return {sampling: Pipeline.from_pretrained(tiny_bundle, device="cpu", sampling=sampling)
            for sampling in ("inverted", "f1")}


def forward_inputs(transformer, seed: int = 0) -> dict:
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 3, 8, 10, generator=g),  # 60 noisy tokens
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 7, cfg.text_embed_dim, generator=g),
        encoder_attention_mask=None,
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        image_embeds=torch.randn(1, 9, cfg.image_proj_dim, generator=g),
        indices_latents=torch.arange(3, 6),
        guidance=torch.tensor([10000.0]),
        latents_clean=torch.randn(1, cfg.in_channels, 1, 8, 10, generator=g),
        indices_latents_clean=torch.tensor([0]),
    )


def test_one_forward_over_two_ranks_matches_the_plain_forward(tiny_bundle, plain):
    split = sequence_parallel_pipeline(tiny_bundle, "inverted")
    inputs = forward_inputs(split.components.transformer)
    with torch.inference_mode():
        expected = plain["inverted"].components.transformer(**inputs)
        got = split.components.transformer(**inputs)
    assert got.shape == expected.shape == (1, 16, 3, 8, 10)
    assert (got - expected).abs().max().item() < 1e-4


def run(pipeline: Pipeline, image, **settings) -> list:
    return list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 2, **settings})))


# Inverted without TeaCache is compared in the killed-worker test, after the group restarts.
@pytest.mark.parametrize(("sampling", "teacache"), [("inverted", True), ("f1", True)])
def test_two_ranks_make_the_same_video_as_one(tiny_bundle, plain, image, sampling, teacache):
    split = sequence_parallel_pipeline(tiny_bundle, sampling)
    settings = {"teacache": teacache, "teacache_threshold": 0.5} if teacache else {"teacache": False}
    expected, got = run(plain[sampling], image, **settings)[-1], run(split, image, **settings)[-1]
    assert isinstance(got, GenerationResult) and got.frames.shape == expected.frames.shape
    assert np.abs(got.frames.astype(int) - expected.frames.astype(int)).max() <= 1
    assert got.timings["skipped_steps"] == expected.timings["skipped_steps"]
    if teacache:
        assert got.timings["skipped_steps"] > 0  # rank 0 skipped steps; the worker was simply not asked
    assert got.settings["sequence_parallel"] == 2 and expected.settings["sequence_parallel"] == 1


def test_a_killed_worker_fails_that_job_in_one_line_and_the_next_job_runs(tiny_bundle, plain, image):
    split = sequence_parallel_pipeline(tiny_bundle, "inverted")
    group = split.sequence_group
    starts = group.starts
    worker = group.workers[0]
    with pytest.raises(SequenceParallelError) as failure:
        for event in split.generate(request(image, "x", **{**FAST, "seconds": 2, "teacache": False})):
            if isinstance(event, StepProgress) and event.step == 1:
                os.kill(worker.pid, signal.SIGKILL)
    message = str(failure.value)
    assert "\n" not in message
    assert f"sequence-parallel worker rank 1 (pid {worker.pid}) exited with code -9" in message
    assert "restarts for the next job" in message

    expected = run(plain["inverted"], image, teacache=False)[-1]
    got = run(split, image, teacache=False)[-1]
    assert group.starts == starts + 1 and group.workers[0].pid != worker.pid
    assert np.abs(got.frames.astype(int) - expected.frames.astype(int)).max() <= 1


def test_an_idle_worker_waits_on_its_stdin_and_stops_at_its_end_without_a_collective(tiny_bundle):
    """Between jobs a worker sits in readline, not in a collective with a timeout; end-of-file
    (rank 0 closed the pipe or died) ends its loop."""
    import io

    from framepack_backend.models.transformer import FramePackTransformer
    from framepack_backend.sequence_group import serve_blocks

    transformer = FramePackTransformer.from_pretrained(tiny_bundle / "transformer", dtype=torch.float32)
    transformer.block_runner = object()  # never called: no line asks for a run
    assert serve_blocks(transformer, torch.device("cpu"), wake=io.BytesIO(b"")) is None
