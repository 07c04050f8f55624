"""The blocks replayed from CUDA graphs (models/graphs.py) give the eager output."""

import pytest
import torch

from framepack_backend.attention import Attend
from framepack_backend.models.graphs import BlockGraphs
from framepack_backend.pipeline import Pipeline
from framepack_backend.settings import EngineOptions


def test_cuda_graphs_are_refused_on_the_cpu_and_the_pool_is_bounded(tiny_bundle):
    with pytest.raises(ValueError, match="cuda_graphs=True is not allowed: expected a CUDA device"):
        Pipeline.from_pretrained(tiny_bundle, device="cpu", options=EngineOptions(cuda_graphs=True))
    with pytest.raises(ValueError, match="max_graphs=0"):
        BlockGraphs(lambda *tensors, attend: tensors[0], max_graphs=0)


def test_a_job_whose_weights_move_runs_without_graphs_and_says_so(tiny_bundle, image):
    """cuda_graphs is an instance option; a job in memory mode offload cannot replay graphs
    (the weights move), so it runs eagerly and its record says cuda_graphs False."""
    from framepack_backend.components import load_components
    from framepack_backend.request import GenerationRequest

    components = load_components(tiny_bundle, "cpu", torch.float32)
    # Built directly: configure_transformer would refuse graphs on the CPU before any job.
    pipeline = Pipeline(components, torch.device("cpu"), torch.float32, tiny_bundle, EngineOptions(cuda_graphs=True))
    graphs_during_steps = set()
    for event in pipeline.generate(GenerationRequest.parse(image, "x", resolution=128, steps=2, seconds=1,
                                                           teacache=False, memory_mode="offload")):
        if type(event).__name__ == "StepProgress":
            graphs_during_steps.add(components.transformer.block_graphs is not None)
    assert graphs_during_steps == {False}
    assert (event.settings["cuda_graphs"], event.settings["memory_mode"]) == (False, "offload")
    assert event.frames.shape[0] == 37


@pytest.mark.gpu
@pytest.mark.parametrize("fused_kernels", [True, False])
def test_graph_replay_equals_eager_and_follows_new_inputs(fused_kernels):
    # Imported here: these modules import diffusers, and with it Triton, which must come after
    # test_kernels has chosen the interpreter for the CPU run.
    from tests.test_transformer_fast_paths import GPU_CONFIG, bf16, gpu_inputs
    from tests.test_transformer_parity import build_pair, section_inputs

    _, model = build_pair(GPU_CONFIG, seed=6)
    model = model.cuda().bfloat16()
    model.set_fused_kernels(fused_kernels)
    attend = Attend.named("sdpa")
    first = bf16(gpu_inputs())
    second = dict(first, hidden_states=torch.randn_like(first["hidden_states"]),
                  timestep=first["timestep"] * 0.3)
    other_shape = bf16({k: v.cuda() for k, v in section_inputs(1, 5, 16, 16, 0, [7], 7, seed=4).items()})
    other_shape = dict(other_shape, encoder_hidden_states=torch.randn(1, 7, 256, device="cuda").bfloat16(),
                       image_embeds=torch.randn(1, 16, 64, device="cuda").bfloat16())
    with torch.inference_mode():
        eager = [model(**inputs, attend=attend) for inputs in (first, second, other_shape)]
        model.enable_cuda_graphs(True, max_graphs=1)
        graphs = model.block_graphs
        replayed = [model(**inputs, attend=attend) for inputs in (first, second, other_shape, first)]
    for got, expected in zip(replayed, eager + eager[:1]):
        assert got.shape == expected.shape
        assert (got.float() - expected.float()).abs().max() <= 1e-3 * expected.float().abs().max()
    assert not torch.equal(replayed[0], replayed[1])  # the second input was copied in, not ignored
    # first (capture), second (replay), other shape (capture, evicts), first again (capture).
    assert len(graphs.capture_s) == 3 and len(graphs.graphs) == 1
    print(f"capture times (s), fused_kernels={fused_kernels}: {graphs.capture_s}")
    assert max(graphs.capture_s) < 30
    model.enable_cuda_graphs(False)
    assert model.block_graphs is None
