import dataclasses

import pytest
import torch

from framepack_backend import attention as attention_module
from framepack_backend.attention import (
    BACKEND_NAMES,
    Attend,
    AttentionBackend,
    available_backends,
    choose_backend,
    resolve_backend,
)
from framepack_backend.settings import ATTENTION_BACKENDS, SettingsError


def naive_attention(q, k, v, key_mask=None):
    """softmax(q kᵀ / sqrt(d)) v written out, on (batch, seq, heads, head_dim)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("batch,q_len,kv_len,heads,head_dim", [(1, 5, 5, 1, 8), (2, 7, 11, 3, 16), (3, 13, 6, 2, 4)])
def test_sdpa_matches_naive_softmax_attention(batch, q_len, kv_len, heads, head_dim):
    g = torch.Generator().manual_seed(batch * 100 + q_len)
    q = torch.randn(batch, q_len, heads, head_dim, generator=g)
    k = torch.randn(batch, kv_len, heads, head_dim, generator=g)
    v = torch.randn(batch, kv_len, heads, head_dim, generator=g)

    out = Attend.named("sdpa").local(q, k, v)

    assert out.shape == (batch, q_len, heads, head_dim)
    assert (out - naive_attention(q, k, v)).abs().max() < 1e-5


def test_key_mask_hides_padded_keys():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=g) for _ in range(3))
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, 6:] = False
    key_mask[1, 4:] = False

    attend = Attend.default("cpu")
    out = attend.local(q, k, v, key_mask=key_mask)

    assert (out - naive_attention(q, k, v, key_mask)).abs().max() < 1e-5
    # Sample 1 equals attention over its 4 real keys only.
    cropped = attend.local(q[1:], k[1:, :4], v[1:, :4])
    assert (out[1:] - cropped).abs().max() < 1e-5


def test_unknown_backend_error_lists_available_ones():
    with pytest.raises(ValueError) as error:
        Attend.named("no-such-kernel")
    message = str(error.value)
    assert "'no-such-kernel' is unknown" in message
    assert "available: sdpa" in message


def fake_backend(name, run, is_available, **capabilities) -> AttentionBackend:
    declared = dict(exact=True, key_mask=True, sequence_parallel=True, devices=("cpu", "cuda"))
    return AttentionBackend(name, run, is_available, **{**declared, **capabilities})


def test_registered_but_unavailable_backend_is_refused(monkeypatch):
    backend = fake_backend("flash", lambda q, k, v, m: q, lambda: False)
    monkeypatch.setitem(attention_module._BACKENDS, "flash", backend)

    assert "flash" not in available_backends()
    with pytest.raises(ValueError, match="'flash' is not available on this machine; available: sdpa"):
        Attend.named("flash")  # what binding a job's attention asks


def test_registered_backend_is_dispatched_by_name(monkeypatch):
    calls = []

    def doubling(q, k, v, key_mask):
        calls.append(key_mask)
        return 2 * v

    backend = fake_backend("double", doubling, lambda: True)
    monkeypatch.setitem(attention_module._BACKENDS, "double", backend)
    v = torch.ones(1, 3, 1, 2)

    out = Attend.named("double").local(v, v, v)

    assert available_backends() == ["double", "sdpa"]
    assert torch.equal(out, 2 * v) and calls == [None]


def test_resolve_backend_auto_and_errors():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(SettingsError, match="attention='flash' is not allowed: expected one of auto, sdpa"):
        resolve_backend("flash", "cpu")


# Relative error allowed per backend against float64 attention, bf16 inputs of size (1, 4096, 8, 128).
# "sage" quantizes q and k to int8 by design, "cudnn-fp8" q, k, v, the probabilities and
# the output to e4m3.
GPU_TOLERANCE = {"sdpa": 1e-2, "flash": 1e-2, "xformers": 1e-2, "sage": 5e-2, "cudnn-fp8": 1e-1}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", sorted(GPU_TOLERANCE))
def test_gpu_backends_match_exact_attention(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed or not supported on this GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = Attend.named(backend).local(q, k, v).double()
    ref = naive_attention(q, k, v).double()
    rel = float((out - ref).norm() / ref.norm())
    assert out.shape == q.shape
    assert rel < GPU_TOLERANCE[backend], f"{backend}: relative error {rel:.3e}"


@pytest.mark.gpu
def test_gpu_fp8_attention_at_the_engine_lengths_and_layouts():
    """cuDNN FP8 attention on a joint length that is no multiple of 64, with v a strided projection view."""
    if "cudnn-fp8" not in available_backends():
        pytest.skip("cudnn-fp8 needs a Hopper GPU and nvidia-cudnn-frontend")
    g = torch.Generator(device="cuda").manual_seed(1)
    heads, head_dim, tokens = 4, 128, 1600 + 729 + 37
    q, k = (torch.randn(1, tokens, heads, head_dim, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    projection = torch.randn(1, tokens, 3 * heads * head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    v = projection[..., 2 * heads * head_dim:].unflatten(-1, (heads, head_dim))  # token stride 3·heads·head_dim
    ref = naive_attention(q, k, v).double()
    for scale in (1.0, 40.0):  # outputs far below and far above 1: per-tensor scales follow them
        out = Attend.named("cudnn-fp8").joint(q, k, v if scale == 1 else v * scale, n_latent=1600).double()
        rel = float((out - ref * scale).norm() / (ref * scale).norm())
        assert out.shape == q.shape and rel < GPU_TOLERANCE["cudnn-fp8"], f"scale {scale}: relative error {rel:.3e}"
    with pytest.raises(ValueError, match="must share batch, heads and head_dim"):
        Attend.named("cudnn-fp8").local(q, k[:, :, :2], v[:, :, :2])


def test_fp8_attention_is_refused_on_a_cpu():
    with pytest.raises(SettingsError, match="attention='cudnn-fp8' is not allowed"):
        resolve_backend("cudnn-fp8", "cpu")


@pytest.mark.gpu
def test_auto_picks_an_exact_backend_on_gpu():
    assert resolve_backend("auto", "cuda") in ("flash", "sdpa", "xformers")


# ----------------------------------------------------------------- the registry and `auto`


def test_registry_declares_each_backend_and_the_setting_reads_its_names():
    declared = {
        name: (b.exact, b.key_mask, b.sequence_parallel, b.devices, b.dtypes, b.auto_rank)
        for name, b in attention_module._BACKENDS.items()
    }
    half = (torch.float16, torch.bfloat16)
    assert declared == {
        "sdpa": (True, True, True, ("cpu", "cuda"), None, 1),
        "flash": (True, False, True, ("cuda",), half, 0),
        "sage": (False, False, True, ("cuda",), half, None),
        "xformers": (True, True, True, ("cuda",), (*half, torch.float32), 2),
        "cudnn-fp8": (False, False, True, ("cuda",), half, None),
    }
    assert BACKEND_NAMES == ("sdpa", "flash", "sage", "xformers", "cudnn-fp8")
    assert ATTENTION_BACKENDS == ("auto", "sdpa", "flash", "sage", "xformers", "cudnn-fp8")


def gpu_machine(monkeypatch, flash_attn_installed=True, unavailable=()):
    """Pretend every registered backend can run here (a GPU machine), except `unavailable`."""
    for name, backend in list(attention_module._BACKENDS.items()):
        available = name not in unavailable
        replaced = dataclasses.replace(backend, is_available=lambda available=available: available)
        if name == "flash":
            replaced = dataclasses.replace(replaced, auto_if=lambda: flash_attn_installed)
        monkeypatch.setitem(attention_module._BACKENDS, name, replaced)


def test_auto_picks_the_fastest_exact_backend_that_supports_the_call(monkeypatch):
    gpu_machine(monkeypatch)
    bf16 = torch.bfloat16
    assert choose_backend("cuda", bf16).name == "flash"
    assert resolve_backend("auto", "cuda", bf16) == "flash"
    assert choose_backend("cuda", bf16, key_mask=True).name == "sdpa"  # flash takes no key mask
    assert choose_backend("cuda", torch.float32).name == "sdpa"  # flash takes half precision only
    assert choose_backend("cuda", bf16, sequence_parallel=True).name == "flash"
    assert choose_backend("cpu", bf16).name == "sdpa"  # the only backend that runs on a CPU
    assert Attend.default("cpu").name == "sdpa"


def test_auto_without_flash_attn_is_sdpa_then_xformers_and_never_sage(monkeypatch):
    gpu_machine(monkeypatch, flash_attn_installed=False)
    assert choose_backend("cuda", torch.bfloat16).name == "sdpa"
    gpu_machine(monkeypatch, flash_attn_installed=False, unavailable=("sdpa",))
    assert choose_backend("cuda", torch.bfloat16).name == "xformers"
    gpu_machine(monkeypatch, flash_attn_installed=False, unavailable=("sdpa", "xformers"))
    with pytest.raises(ValueError, match="no exact attention backend supports this call"):
        choose_backend("cuda", torch.bfloat16)  # only flash's slow fallback and the inexact sage are left
    # Even ranked first, an inexact backend is not `auto`'s to pick.
    monkeypatch.setitem(attention_module._BACKENDS, "sage",
                        dataclasses.replace(attention_module._BACKENDS["sage"], auto_rank=-1))
    gpu_machine(monkeypatch)
    assert choose_backend("cuda", torch.bfloat16).name == "flash"


def test_a_named_backend_must_run_on_the_job_device(monkeypatch):
    gpu_machine(monkeypatch)
    assert resolve_backend("sage", "cuda", torch.bfloat16) == "sage"  # asked for by name: allowed
    with pytest.raises(SettingsError, match="attention='flash' is not allowed: expected one of auto, sdpa on"):
        resolve_backend("flash", "cpu")
    assert Attend.for_setting("auto", "cpu").name == "sdpa"


# ----------------------------------------------------------------- the bound object and its seam


def test_joint_attention_equals_local_attention_and_checks_the_key_mask():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 10, 2, 8, generator=g) for _ in range(3))
    attend = Attend.named("sdpa")
    assert torch.equal(attend.joint(q, k, v, n_latent=7), attend.local(q, k, v))
    assert attend.group is None

    no_mask = Attend(fake_backend("nomask", lambda q, k, v, m: v, lambda: True, key_mask=False))
    with pytest.raises(ValueError, match="'nomask' does not take a key mask; crop the text"):
        no_mask.joint(q, k, v, 7, key_mask=torch.ones(1, 10, dtype=torch.bool))


def test_a_backend_that_cannot_be_split_refuses_a_group_and_a_split_joint_refuses_a_key_mask():
    q = torch.zeros(1, 4, 2, 8)
    group = object()  # stands in for a sequence_parallel.TokenShards
    with pytest.raises(ValueError, match="sequence-parallel attention takes no key mask"):
        Attend.named("sdpa").split_over(group).joint(q, q, q, 3, key_mask=torch.ones(1, 4, dtype=torch.bool))
    unsplittable = fake_backend("whole", lambda q, k, v, m: v, lambda: True, sequence_parallel=False)
    with pytest.raises(ValueError, match="'whole' cannot be split for sequence parallelism"):
        Attend(unsplittable, group=group)
