import json

import pytest
import torch

from framepack_backend.components import PUBLIC_SOURCES, Components, load_components
from framepack_backend.testing.tiny_bundle import TINY_TRANSFORMER, main, write_tiny_bundle

EXPECTED_FILES = {
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_tiny_bundle(tmp_path_factory.mktemp("tiny"), seed=0)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_formats(bundle):
    files = set(_files(bundle))
    assert EXPECTED_FILES <= files
    shards = sorted(f for f in files if f.startswith("transformer/diffusion_pytorch_model-"))
    assert len(shards) >= 2
    index = json.loads((bundle / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(f"transformer/{name}" for name in set(index["weight_map"].values())) == shards
    f1_files = {f for f in files if f.startswith("transformer_f1/")}
    assert {"transformer_f1/config.json", "transformer_f1/diffusion_pytorch_model.safetensors.index.json"} <= f1_files
    assert files - EXPECTED_FILES - f1_files == set(shards)


def test_configs_have_the_real_structure(bundle):
    vae = json.loads((bundle / "vae/config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKLHunyuanVideo"
    assert vae["latent_channels"] == 16 and vae["scaling_factor"] == 0.476986
    assert vae["spatial_compression_ratio"] == 8 and vae["temporal_compression_ratio"] == 4
    transformer = json.loads((bundle / "transformer/config.json").read_text())
    assert transformer["_class_name"] == "HunyuanVideoFramepackTransformer3DModel"
    assert transformer["rope_axes_dim"] == list(TINY_TRANSFORMER["rope_axes_dim"])
    assert sum(transformer["rope_axes_dim"]) == transformer["attention_head_dim"]
    llama = json.loads((bundle / "text_encoder/config.json").read_text())
    clip = json.loads((bundle / "text_encoder_2/config.json").read_text())
    siglip = json.loads((bundle / "image_encoder/config.json").read_text())
    assert llama["architectures"] == ["LlamaModel"] and llama["num_hidden_layers"] >= 3
    assert clip["architectures"] == ["CLIPTextModel"] and clip["max_position_embeddings"] == 77
    assert siglip["architectures"] == ["SiglipVisionModel"]
    assert transformer["text_embed_dim"] == llama["hidden_size"]
    assert transformer["pooled_projection_dim"] == clip["hidden_size"]
    assert transformer["image_proj_dim"] == siglip["hidden_size"]
    assert transformer["has_image_proj"] and transformer["has_clean_x_embedder"] and transformer["guidance_embeds"]
    merges = (bundle / "tokenizer_2/merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and all(len(line.split(" ")) == 2 for line in merges[1:])


def test_weights_are_deterministic_from_the_seed(bundle, tmp_path):
    again = _files(write_tiny_bundle(tmp_path / "again", seed=0))
    assert again == _files(bundle)
    other = _files(write_tiny_bundle(tmp_path / "other", seed=1))
    assert other["transformer/config.json"] == again["transformer/config.json"]
    for weights in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert other[weights] != again[weights]


def test_writing_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_bundle(tmp_path, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_cli_writes_a_bundle(tmp_path, capsys):
    main([str(tmp_path / "cli")])
    assert "wrote tiny model bundle" in capsys.readouterr().out
    assert EXPECTED_FILES <= set(_files(tmp_path / "cli"))


def test_load_components(bundle):
    components = load_components(bundle, device="cpu", dtype=torch.float32)
    assert isinstance(components, Components)
    assert type(components.text_encoder).__name__ == "LlamaModel"
    assert type(components.text_encoder_2).__name__ == "CLIPTextModel"
    assert type(components.tokenizer_2).__name__ == "CLIPTokenizer"
    assert type(components.vae).__name__ == "AutoencoderKLHunyuanVideo"
    assert type(components.image_encoder).__name__ == "SiglipVisionModel"
    assert type(components.transformer).__name__ == "FramePackTransformer"
    models = [components.text_encoder, components.text_encoder_2, components.vae, components.image_encoder]
    for model in models + [components.transformer]:
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    # CPU policy: encoders and VAE in fp32; the transformer in the requested dtype.
    assert all(next(m.parameters()).dtype == torch.float32 for m in models)
    assert next(components.transformer.parameters()).dtype == torch.float32
    bf16 = load_components(bundle, device="cpu")
    assert next(bf16.transformer.parameters()).dtype == torch.bfloat16


def test_transformer_output_is_finite_and_varies(bundle):
    transformer = load_components(bundle, dtype=torch.float32).transformer
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
        encoder_attention_mask=None,
        pooled_projections=torch.randn(1, 32, generator=g),
        image_embeds=torch.randn(1, 16, 32, generator=g),
        indices_latents=torch.arange(2),
        guidance=torch.tensor([10000.0]),
    )
    with torch.no_grad():
        early = transformer(timestep=torch.tensor([900.0]), **inputs)
        late = transformer(timestep=torch.tensor([100.0]), **inputs)
    assert early.shape == (1, 16, 2, 4, 4)
    assert torch.isfinite(early).all()
    assert 0.05 < early.std().item() < 20
    assert (early - late).abs().max().item() > 1e-3


def test_missing_folders_are_named_with_their_source(tmp_path):
    for name in PUBLIC_SOURCES:
        if name != "image_encoder":
            (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_components(tmp_path)
    message = str(info.value)
    assert "image_encoder/" in message and "lllyasviel/flux_redux_bfl" in message
    assert "transformer/" in message and "lllyasviel/FramePackI2V_HY" in message
    assert "text_encoder/" not in message


def test_missing_model_dir_and_bad_variant(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir"):
        load_components(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="transformer_subfolder"):
        load_components(tmp_path, transformer_subfolder="transformer_v2")
