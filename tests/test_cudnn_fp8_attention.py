"""The cudnn-fp8 backend's wiring, on a CPU, against a stand-in for cuDNN's FP8 attention.

The stand-in computes what cuDNN's FP8 SDPA forward computes (per-tensor descales on
q, k, v; the unnormalized probabilities quantized with scale_s; the output written as
e4m3 with scale_o) from the very buffers and scale cells the backend hands it, so a
swapped scale, a wrong stride or a misplaced output shows up as a wrong result. The
real kernel runs in the GPU tests (tests/test_attention.py).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from framepack_backend import cudnn_fp8_attention as backend


class FakeTensor:
    def __init__(self, name: str, dim=None, stride=None, data_type=None):
        self.name, self.dim, self.stride, self.data_type, self.output = name, dim, stride, data_type, False

    def set_output(self, output):
        self.output = output
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self


class FakeGraph:
    built: list[FakeGraph] = []

    def __init__(self, io_data_type, intermediate_data_type, compute_data_type, handle):
        self.io_data_type, self.handle, self.steps = io_data_type, handle, []
        FakeGraph.built.append(self)

    def tensor(self, name, dim, stride, data_type):
        return FakeTensor(name, list(dim), list(stride), data_type)

    def sdpa_fp8(self, q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o,
                 generate_stats, attn_scale, use_causal_mask, name):
        assert generate_stats is False and use_causal_mask is False
        self.inputs = dict(q=q, k=k, v=v, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
                           descale_s=descale_s, scale_s=scale_s, scale_o=scale_o)
        self.attn_scale = attn_scale
        self.o, self.amax_s, self.amax_o = FakeTensor("o"), FakeTensor("amax_s"), FakeTensor("amax_o")
        return [self.o, None, self.amax_s, self.amax_o]

    def validate(self):
        self.steps.append("validate")

    def build_operation_graph(self):
        self.steps.append("build_operation_graph")

    def create_execution_plans(self, modes):
        self.steps.append("create_execution_plans")

    def check_support(self):
        self.steps.append("check_support")

    def build_plans(self):
        self.steps.append("build_plans")

    def get_workspace_size(self):
        return 64

    def execute(self, buffers, workspace, handle):
        assert handle == self.handle and workspace.numel() == 64
        assert all(t.output for t in (self.o, self.amax_s, self.amax_o))

        def view(t):  # the buffer seen through the graph's dims and strides
            return buffers[t].as_strided(t.dim, t.stride)

        def cell(name):
            tensor = buffers[self.inputs[name]]
            assert tensor.dtype == torch.float32 and tensor.numel() == 1
            return tensor.item()

        q, k, v = (view(self.inputs[n]).float() for n in "qkv")
        scores = q @ k.transpose(-1, -2) * cell("descale_q") * cell("descale_k") * self.attn_scale
        unnormalized = (scores - scores.amax(-1, keepdim=True)).exp()
        p8 = (unnormalized * cell("scale_s")).to(torch.float8_e4m3fn).float()
        o = p8 @ v * cell("descale_s") * cell("descale_v") / unnormalized.sum(-1, keepdim=True)
        view(self.o).copy_((o * cell("scale_o")).to(torch.float8_e4m3fn))
        buffers[self.amax_o].fill_(o.abs().max())
        buffers[self.amax_s].fill_(unnormalized.max())


@pytest.fixture
def fake_cudnn(monkeypatch):
    module = types.ModuleType("cudnn")
    module.data_type = types.SimpleNamespace(FP8_E4M3="fp8_e4m3", FLOAT="float")
    module.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
    module.pygraph = FakeGraph
    module.streams = []
    module.set_stream = lambda handle, stream: module.streams.append((handle, stream))
    module.backend_version = lambda: 92801
    monkeypatch.setitem(sys.modules, "cudnn", module)
    monkeypatch.setattr(backend, "_handle", lambda device: 7)
    monkeypatch.setattr(backend, "_current_stream", lambda device: 11)
    monkeypatch.setattr(backend, "_plans", type(backend._plans)())
    FakeGraph.built = []
    return module


def exact_attention(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def test_fp8_attention_hands_cudnn_the_scales_and_layout_it_expects(fake_cudnn):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 150, 3, 32, generator=g).to(torch.bfloat16) for _ in "qk")
    projection = torch.randn(2, 150, 3 * 3 * 32, generator=g).to(torch.bfloat16) * 30
    v = projection[..., 2 * 3 * 32:].unflatten(-1, (3, 32))  # a projection view, far from unit scale
    out = backend.cudnn_fp8_attention(q, k, v)
    ref = exact_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    rel = float((out.double() - ref).norm() / ref.norm())
    # e4m3 keeps 3 mantissa bits: the output alone carries ~3.6 % RMS rounding, the inputs and
    # probabilities add theirs (5.9 % here); a swapped or missing scale would be off by far more.
    assert rel < 0.08, f"relative error {rel:.3e}"
    [graph] = FakeGraph.built
    assert graph.io_data_type == "fp8_e4m3" and graph.attn_scale == pytest.approx(32**-0.5)
    assert graph.steps == ["validate", "build_operation_graph", "create_execution_plans", "check_support",
                           "build_plans"]
    assert graph.inputs["q"].dim == [2, 3, 150, 32] and graph.inputs["q"].stride == [150 * 96, 32, 96, 1]
    assert fake_cudnn.streams == [(7, 11)]


def test_one_graph_per_shape_reused_and_bounded(fake_cudnn, monkeypatch):
    monkeypatch.setattr(backend, "MAX_GRAPHS", 2)
    x = torch.randn(1, 20, 2, 16).to(torch.bfloat16)
    for _ in range(2):
        backend.cudnn_fp8_attention(x, x, x)
    assert len(FakeGraph.built) == 1
    for tokens in (21, 22, 20):
        y = x[:, :1].expand(1, tokens, 2, 16).contiguous()
        backend.cudnn_fp8_attention(y, y, y)
    # 21 and 22 pushed 20 out of a pool of 2, so 20 was built again.
    assert len(FakeGraph.built) == 4 and len(backend._plans) == 2


def test_a_shape_cudnn_refuses_is_reported_with_the_shape(fake_cudnn, monkeypatch):
    def refuse(self):
        raise RuntimeError("no engine")

    monkeypatch.setattr(FakeGraph, "check_support", refuse)
    x = torch.randn(1, 20, 2, 16).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"no kernel for .* \(1, 2, 20, 20, 16\) on cpu: no engine"):
        backend.cudnn_fp8_attention(x, x, x)
    with pytest.raises(ValueError, match="must share batch, heads and head_dim"):
        backend.cudnn_fp8_attention(x, x[:, :, :1], x[:, :, :1])
