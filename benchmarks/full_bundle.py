"""A full-size random-weight model directory in the public layout, for server benchmarks.

Llama-3-8B, CLIP-L, SigLIP, the HunyuanVideo VAE and the 13B transformer in their public
configurations (benchmarks/generation.py builds the same in-process), written with
save_pretrained like the real repositories: about 43 GB. Tokenizers and the SigLIP
preprocessor come from the tiny bundle (token ids only select embedding rows, so the
vocabulary does not change the cost). The weights are built on the GPU.

    python benchmarks/full_bundle.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generation import build_components  # noqa: E402

from framepack_backend.testing.tiny_bundle import write_tiny_bundle  # noqa: E402

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def write_full_bundle(out: Path, weight_scale: float = 0.05) -> Path:
    """Write the bundle under `out` (replacing it); returns `out`."""
    if out.exists():
        shutil.rmtree(out)
    write_tiny_bundle(out)
    components = build_components(torch.device("cuda"), weight_scale)
    for folder, model in (("text_encoder", components.text_encoder), ("text_encoder_2", components.text_encoder_2),
                          ("image_encoder", components.image_encoder), ("vae", components.vae),
                          ("transformer", components.transformer)):
        tiny_config = json.loads((out / folder / "config.json").read_text())
        config = getattr(model, "config", None)
        for key in TOKEN_ID_KEYS:  # the tiny tokenizers' special tokens
            if key in tiny_config and hasattr(config, key):
                setattr(config, key, tiny_config[key])
        shutil.rmtree(out / folder)
        model.save_pretrained(out / folder)
    shutil.rmtree(out / "transformer_f1")  # one transformer is enough to serve
    set_processor_size(out, components.image_encoder.config.image_size)
    return out


def set_processor_size(out: Path, side: int) -> None:
    """The SigLIP preprocessor resizes to the encoder's input (384 at full size)."""
    path = out / "feature_extractor" / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["size"] = {"height": side, "width": side}
    path.write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--weight-scale", type=float, default=0.05,
                        help="transformer weights ×this (finite activations)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/full_bundle.py builds the weights on a CUDA GPU")
    start = time.perf_counter()
    out = write_full_bundle(args.out, args.weight_scale)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {size / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
