import pytest
import torch

from framepack_backend import attention as attention_module
from framepack_backend.attention import attention, available_backends, resolve_backend
from framepack_backend.settings import SettingsError


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

    out = attention(q, k, v, backend="sdpa")

    assert out.shape == (batch, q_len, heads, head_dim)
    assert (out - naive_attention(q, k, v)).abs().max() < 1e-5


def test_key_mask_hides_padded_keys():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=g) for _ in range(3))
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, 6:] = False
    key_mask[1, 4:] = False

    out = attention(q, k, v, key_mask=key_mask)

    assert (out - naive_attention(q, k, v, key_mask)).abs().max() < 1e-5
    # Sample 1 equals attention over its 4 real keys only.
    cropped = attention(q[1:], k[1:, :4], v[1:, :4])
    assert (out[1:] - cropped).abs().max() < 1e-5


def test_unknown_backend_error_lists_available_ones():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError) as error:
        attention(q, q, q, backend="no-such-kernel")
    message = str(error.value)
    assert "'no-such-kernel' is unknown" in message
    assert "available: sdpa" in message


def test_registered_but_unavailable_backend_is_refused(monkeypatch):
    backend = attention_module.AttentionBackend("flash", lambda q, k, v, m: q, lambda: False)
    monkeypatch.setitem(attention_module._BACKENDS, "flash", backend)

    assert "flash" not in available_backends()
    with pytest.raises(ValueError, match="'flash' is not available on this machine; available: sdpa"):
        attention_module.require_backend("flash")  # what set_attention_backend asks


def test_registered_backend_is_dispatched_by_name(monkeypatch):
    calls = []

    def doubling(q, k, v, key_mask):
        calls.append(key_mask)
        return 2 * v

    backend = attention_module.AttentionBackend("double", doubling, lambda: True)
    monkeypatch.setitem(attention_module._BACKENDS, "double", backend)
    v = torch.ones(1, 3, 1, 2)

    out = attention(v, v, v, backend="double")

    assert available_backends() == ["double", "sdpa"]
    assert torch.equal(out, 2 * v) and calls == [None]


def test_resolve_backend_auto_and_errors():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(SettingsError, match="attention='flash' is not allowed: expected one of auto, sdpa"):
        resolve_backend("flash", "cpu")


# Relative error allowed per backend against float64 attention, bf16 inputs of size (1, 4096, 8, 128).
# "sage" quantizes q and k to int8 by design.
GPU_TOLERANCE = {"sdpa": 1e-2, "flash": 1e-2, "xformers": 1e-2, "sage": 5e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", sorted(GPU_TOLERANCE))
def test_gpu_backends_match_exact_attention(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed or not supported on this GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, backend=backend).double()
    ref = naive_attention(q, k, v).double()
    rel = float((out - ref).norm() / ref.norm())
    assert out.shape == q.shape
    assert rel < GPU_TOLERANCE[backend], f"{backend}: relative error {rel:.3e}"


@pytest.mark.gpu
def test_auto_picks_an_exact_backend_on_gpu():
    assert resolve_backend("auto", "cuda") in ("flash", "sdpa", "xformers")
