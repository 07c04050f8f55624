"""Loading every model component from one local model directory.

The directory holds the public repositories' sub-folders side by side (see
docs/architecture.md); the tiny bundle (`python -m framepack_backend.testing.tiny_bundle`) has the
same layout, so real weights and the tiny model go through this one code path. Nothing
is downloaded: every loader runs with `local_files_only=True`.

Dtype policy: the text encoders, the VAE and SigLIP run in fp16 on a GPU (their public
dtype, as the reference runs them) and in fp32 on a CPU, where fp16 kernels are slow or
missing; `encoder_dtype` overrides this. The transformer gets `dtype` (bf16 by default).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .variants import SamplingVariant

HUNYUAN_VIDEO_REPO = "hunyuanvideo-community/HunyuanVideo"
FLUX_REDUX_REPO = "lllyasviel/flux_redux_bfl"
# transformer sub-folder → public repository, per sampling variant
TRANSFORMER_REPOS = {
    SamplingVariant.INVERTED.transformer_folder: "lllyasviel/FramePackI2V_HY",
    SamplingVariant.F1.transformer_folder: "lllyasviel/FramePack_F1_I2V_HY_20250503",
}
# sub-folder → public repository it is copied from
PUBLIC_SOURCES = {
    "text_encoder": HUNYUAN_VIDEO_REPO,
    "tokenizer": HUNYUAN_VIDEO_REPO,
    "text_encoder_2": HUNYUAN_VIDEO_REPO,
    "tokenizer_2": HUNYUAN_VIDEO_REPO,
    "vae": HUNYUAN_VIDEO_REPO,
    "image_encoder": FLUX_REDUX_REPO,
    "feature_extractor": FLUX_REDUX_REPO,
}


@dataclass
class Components:
    """The loaded models, in eval mode with gradients off."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    tokenizer_2: Any
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    feature_extractor: Any
    image_encoder: torch.nn.Module
    transformer: torch.nn.Module


def encoder_dtype_for(device: torch.device | str) -> torch.dtype:
    """fp16 on a GPU, fp32 elsewhere (see the module docstring)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_components(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    transformer_subfolder: str = "transformer",
    encoder_dtype: torch.dtype | None = None,
) -> Components:
    """Load all components from `model_dir` onto `device`.

    `transformer_subfolder` picks the variant: "transformer" (inverted anti-drifting) or
    "transformer_f1" (forward). A missing sub-folder raises FileNotFoundError naming it
    and the public repository it comes from.
    """
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel, PreTrainedTokenizerFast, SiglipVisionModel
    from transformers.utils import logging as transformers_logging

    # Servers log to files; per-component progress bars only clutter them.
    transformers_logging.disable_progress_bar()

    from .models.transformer import FramePackTransformer

    model_dir = Path(model_dir)
    folders = _check_layout(model_dir, transformer_subfolder)
    device = torch.device(device)
    encoder_dtype = encoder_dtype or encoder_dtype_for(device)

    def pretrained(cls, name: str, **kwargs):
        return cls.from_pretrained(folders[name], local_files_only=True, **kwargs)

    def pretrained_weights(cls, name: str, **kwargs):
        # Without use_safetensors, transformers and diffusers fall back to pickle files
        # (pytorch_model.bin), and unpickling can run code from the model folder.
        return pretrained(cls, name, use_safetensors=True, **kwargs)

    # The HunyuanVideo tokenizer is Llama-3's byte-level BPE. In transformers 5,
    # LlamaTokenizerFast rebuilds a SentencePiece-style pipeline from tokenizer.json and
    # drops spaces and non-Latin bytes; the generic fast class uses tokenizer.json as
    # written, which is what LlamaTokenizerFast did in transformers 4.
    tokenizer = pretrained(PreTrainedTokenizerFast, "tokenizer")
    tokenizer_2 = pretrained(CLIPTokenizer, "tokenizer_2")
    feature_extractor = pretrained(_siglip_image_processor_class(), "feature_extractor")
    text_encoder = pretrained_weights(LlamaModel, "text_encoder", dtype=encoder_dtype)
    text_encoder_2 = pretrained_weights(CLIPTextModel, "text_encoder_2", dtype=encoder_dtype)
    image_encoder = pretrained_weights(SiglipVisionModel, "image_encoder", dtype=encoder_dtype)
    # diffusers' memory-saving load needs `accelerate` and warns at length without it.
    low_memory = importlib.util.find_spec("accelerate") is not None
    vae = pretrained_weights(AutoencoderKLHunyuanVideo, "vae", torch_dtype=encoder_dtype, low_cpu_mem_usage=low_memory)
    transformer = FramePackTransformer.from_pretrained(folders[transformer_subfolder], dtype=dtype, device=device)

    models = [text_encoder, text_encoder_2, image_encoder, vae, transformer]
    for model in models:
        model.to(device).eval().requires_grad_(False)
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        vae=vae,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


def _check_layout(model_dir: Path, transformer_subfolder: str) -> dict[str, Path]:
    """The component folders of `model_dir`; raises naming every missing one and its source."""
    if transformer_subfolder not in TRANSFORMER_REPOS:
        raise ValueError(
            f"transformer_subfolder={transformer_subfolder!r} is not allowed: expected one of "
            f"{', '.join(TRANSFORMER_REPOS)}"
        )
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"model_dir {model_dir} is not a directory; it must hold the sub-folders "
            f"{', '.join([*PUBLIC_SOURCES, transformer_subfolder])} "
            "(or write a tiny test model with `python -m framepack_backend.testing.tiny_bundle DIR`)"
        )
    sources = {**PUBLIC_SOURCES, transformer_subfolder: TRANSFORMER_REPOS[transformer_subfolder]}
    folders = {name: model_dir / name for name in sources}
    missing = [name for name, folder in folders.items() if not folder.is_dir()]
    if missing:
        lines = []
        for name in missing:
            # The transformer repos are copied whole; the others are sub-folders of their repo.
            part = "the whole repository" if name in TRANSFORMER_REPOS else f"sub-folder {name}/ of"
            lines.append(f"  {name}/  ← {part} {sources[name]}")
        raise FileNotFoundError(f"model_dir {model_dir} lacks component folders:\n" + "\n".join(lines))
    return folders


def _siglip_image_processor_class():
    """SigLIP's PIL image processor, as the reference preprocesses (bicubic resize in PIL).

    transformers 5 makes `SiglipImageProcessor` a torchvision backend when torchvision is
    installed, whose resize differs slightly; the PIL one is `SiglipImageProcessorPil` there.
    """
    import transformers

    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
