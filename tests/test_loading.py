import json

import pytest
import torch
from safetensors import safe_open

from framepack_backend.models.loading import load_safetensors_state_dict, save_sharded_safetensors
from framepack_backend.models.transformer import FramePackTransformer

TINY = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
    num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=12, has_clean_x_embedder=True,
)


def sample_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),            # 8192 bytes
        "a.bias": torch.randn(64, generator=g),                  # 256
        "b.weight": torch.randn(16, 16, generator=g).bfloat16(),  # 512
        "c.steps": torch.arange(10),                             # 80, int64
        "d.big": torch.randn(3000, generator=g),                 # 12000: over the limit, own shard
    }


def test_sharded_round_trip_and_index(tmp_path):
    state = sample_state_dict()

    written = save_sharded_safetensors(state, tmp_path, max_shard_bytes=9000)

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "diffusion_pytorch_model-00001-of-00003.safetensors",
        "diffusion_pytorch_model-00002-of-00003.safetensors",
        "diffusion_pytorch_model-00003-of-00003.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    assert sorted(p.name for p in written) == names
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 8192 + 256 + 512 + 80 + 12000
    assert index["weight_map"] == {
        "a.weight": "diffusion_pytorch_model-00001-of-00003.safetensors",
        "a.bias": "diffusion_pytorch_model-00001-of-00003.safetensors",
        "b.weight": "diffusion_pytorch_model-00001-of-00003.safetensors",  # 8960 bytes so far
        "c.steps": "diffusion_pytorch_model-00002-of-00003.safetensors",  # 9040 > 9000: next shard
        "d.big": "diffusion_pytorch_model-00003-of-00003.safetensors",
    }
    with safe_open(tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == ["c.steps"]

    loaded = load_safetensors_state_dict(tmp_path)
    assert loaded.keys() == state.keys()
    for key in state:
        assert loaded[key].dtype == state[key].dtype
        assert torch.equal(loaded[key], state[key])


def test_single_file_when_it_fits_and_dtype_conversion(tmp_path):
    state = sample_state_dict()
    save_sharded_safetensors(state, tmp_path, max_shard_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_pytorch_model.safetensors"]

    loaded = load_safetensors_state_dict(tmp_path, dtype=torch.float16)

    assert loaded["a.weight"].dtype == torch.float16
    assert loaded["b.weight"].dtype == torch.float16
    assert loaded["c.steps"].dtype == torch.int64  # integers are never cast
    assert (loaded["a.weight"].float() - state["a.weight"]).abs().max() < 1e-2


def test_transformers_style_model_prefix(tmp_path):
    state = sample_state_dict()
    save_sharded_safetensors(state, tmp_path, max_shard_bytes=9000, prefix="model")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(load_safetensors_state_dict(tmp_path)["d.big"], state["d.big"])


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt", "weights.pth"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    # Not a real pickle: were it ever unpickled, the test would fail with a different error.
    (tmp_path / name).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=rf"holds only pickle checkpoints \({name}\).*arbitrary code"):
        load_safetensors_state_dict(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_safetensors_state_dict(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no safetensors checkpoint in .*diffusion_pytorch_model\.safetensors"):
        load_safetensors_state_dict(tmp_path)
    save_sharded_safetensors(sample_state_dict(), tmp_path, max_shard_bytes=9000)
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are not in .*00002-of-00003"):
        load_safetensors_state_dict(tmp_path)


def test_bad_shard_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_shard_bytes must be > 0, got 0"):
        save_sharded_safetensors(sample_state_dict(), tmp_path, max_shard_bytes=0)


def tiny_model() -> FramePackTransformer:
    torch.manual_seed(0)
    return FramePackTransformer(**TINY).eval()


def tiny_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 4, 2, 4, 6, generator=g), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g), encoder_attention_mask=None,
        pooled_projections=torch.randn(1, 8, generator=g), image_embeds=torch.randn(1, 3, 12, generator=g),
        indices_latents=torch.arange(2), guidance=torch.tensor([10000.0]),
        latents_clean=torch.randn(1, 4, 2, 4, 6, generator=g), indices_latents_clean=torch.tensor([0, 3]),
    )


def test_from_pretrained_equals_original(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "HunyuanVideoFramepackTransformer3DModel"
    assert config["rope_axes_dim"] == [2, 2, 4]

    loaded = FramePackTransformer.from_pretrained(tmp_path, dtype=torch.float32)

    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        # Same weights; only the CPU kernels' vector paths may differ with the mapped memory's alignment.
        assert (loaded(**tiny_inputs()) - model(**tiny_inputs())).abs().max() < 1e-6


def test_from_pretrained_casts_to_dtype(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    loaded = FramePackTransformer.from_pretrained(tmp_path)  # bf16 by default
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        inputs = {k: v.bfloat16() if v is not None and v.is_floating_point() else v for k, v in tiny_inputs().items()}
        out = loaded(**inputs)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 2, 4, 6)
    assert torch.isfinite(out).all()


def test_from_pretrained_names_mismatched_keys(tmp_path):
    model = tiny_model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = model.state_dict()
    del state["proj_out.bias"], state["norm_out.linear.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["x_embedder.proj.bias"] = torch.zeros(5)
    save_sharded_safetensors(state, tmp_path, max_shard_bytes=1 << 20)

    with pytest.raises(ValueError) as error:
        FramePackTransformer.from_pretrained(tmp_path)
    message = str(error.value)
    assert "2 missing: norm_out.linear.weight, proj_out.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "1 wrong shape: x_embedder.proj.bias (5,) (model wants (16,))" in message


def test_from_pretrained_needs_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        FramePackTransformer.from_pretrained(tmp_path)


def test_saved_folder_loads_in_diffusers(tmp_path):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    theirs = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tmp_path)
    mine = model.state_dict()
    assert all(torch.equal(value, mine[key]) for key, value in theirs.state_dict().items())
    assert len(theirs.state_dict()) == len(mine)
