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
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .variants import SamplingVariant

if TYPE_CHECKING:
    from .models.transformer import FramePackTransformer

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


# The phases of a job, in job order (memory/manager.py places the weights phase by phase).
JOB_PHASES = ("text", "image", "sampling", "decode")

# A loader: (its sub-folder, dtype, device) -> the module, with weights from safetensors only.
Loader = Callable[[Path, torch.dtype, torch.device], torch.nn.Module]


@dataclass(frozen=True)
class ComponentSpec:
    """One model of the pipeline: how it loads, in which dtype, and how memory modes treat it."""

    name: str  # its field of Components, and its sub-folder (the transformer's depends on the variant)
    load: Loader
    dtype: Literal["encoder", "transformer"]  # encoder: encoder_dtype_for(device) unless overridden;
    # transformer: the pipeline's dtype (module docstring)
    streamed: bool  # stream mode moves its repeated blocks one at a time (the others move whole)
    phases: tuple[str, ...]  # the JOB_PHASES that run it


def _pretrained_weights(
    cls_name: str, module: str = "transformers", dtype_argument: str = "dtype", low_memory: bool = False
) -> Loader:
    """A transformers or diffusers `from_pretrained`, local files and safetensors only."""

    def load(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        cls = getattr(importlib.import_module(module), cls_name)
        # Without use_safetensors, transformers and diffusers fall back to pickle files
        # (pytorch_model.bin), and unpickling can run code from the model folder.
        kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, dtype_argument: dtype}
        if low_memory:
            # diffusers' memory-saving load needs `accelerate` and warns at length without it.
            kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
        return cls.from_pretrained(folder, **kwargs)

    return load


def _load_transformer(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from .models.transformer import FramePackTransformer

    return FramePackTransformer.from_pretrained(folder, dtype=dtype, device=device)


# The model components, in loading order: the one list that loading, memory placement
# (memory/manager.py) and the memory footprint (memory/footprint.py, memory/modes.py) read.
COMPONENT_SPECS = (
    ComponentSpec("text_encoder", _pretrained_weights("LlamaModel"), "encoder", streamed=True, phases=("text",)),
    ComponentSpec("text_encoder_2", _pretrained_weights("CLIPTextModel"), "encoder", streamed=False,
                  phases=("text",)),
    ComponentSpec("image_encoder", _pretrained_weights("SiglipVisionModel"), "encoder", streamed=False,
                  phases=("image",)),
    ComponentSpec("vae", _pretrained_weights("AutoencoderKLHunyuanVideo", "diffusers", "torch_dtype", low_memory=True),
                  "encoder", streamed=False, phases=("image", "decode")),
    ComponentSpec("transformer", _load_transformer, "transformer", streamed=True, phases=("sampling",)),
)
COMPONENT_NAMES = tuple(spec.name for spec in COMPONENT_SPECS)
# The components each phase runs, in table order.
PHASE_COMPONENTS = {phase: tuple(s.name for s in COMPONENT_SPECS if phase in s.phases) for phase in JOB_PHASES}
STREAMED_COMPONENTS = tuple(spec.name for spec in COMPONENT_SPECS if spec.streamed)
# Tokenizers and image preprocessing: loaded beside the models, no weights.
PROCESSORS = ("tokenizer", "tokenizer_2", "feature_extractor")


@dataclass
class Components:
    """The loaded models (COMPONENT_SPECS, in eval mode with gradients off) and their processors."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    tokenizer_2: Any
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    feature_extractor: Any
    image_encoder: torch.nn.Module
    transformer: FramePackTransformer


if {f.name for f in fields(Components)} != {*COMPONENT_NAMES, *PROCESSORS}:
    raise TypeError("Components must have one field per COMPONENT_SPECS entry and per processor")


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
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as transformers_logging

    # Servers log to files; per-component progress bars only clutter them.
    transformers_logging.disable_progress_bar()

    model_dir = Path(model_dir)
    folders = _check_layout(model_dir, transformer_subfolder)
    folders["transformer"] = folders[transformer_subfolder]
    device = torch.device(device)
    dtypes = {"encoder": encoder_dtype or encoder_dtype_for(device), "transformer": dtype}

    # The HunyuanVideo tokenizer is Llama-3's byte-level BPE. In transformers 5,
    # LlamaTokenizerFast rebuilds a SentencePiece-style pipeline from tokenizer.json and
    # drops spaces and non-Latin bytes; the generic fast class uses tokenizer.json as
    # written, which is what LlamaTokenizerFast did in transformers 4.
    processors = {
        "tokenizer": PreTrainedTokenizerFast.from_pretrained(folders["tokenizer"], local_files_only=True),
        "tokenizer_2": CLIPTokenizer.from_pretrained(folders["tokenizer_2"], local_files_only=True),
        "feature_extractor": _siglip_image_processor_class().from_pretrained(
            folders["feature_extractor"], local_files_only=True
        ),
    }
    models = {spec.name: spec.load(folders[spec.name], dtypes[spec.dtype], device) for spec in COMPONENT_SPECS}
    for model in models.values():
        model.to(device).eval().requires_grad_(False)
    return Components(**processors, **models)


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
