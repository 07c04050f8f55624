"""A tiny random-weight model directory in exactly the public layout.

`python -m framepack_backend.testing.tiny_bundle OUT_DIR` writes every component with the same
classes and file formats as the public repositories (config.json + safetensors,
tokenizer files, preprocessor_config.json) but small dimensions, so demos and CI run the
real loading and inference code on a CPU in seconds. Weights are random, deterministic
from the seed; the video they make is noise with structure, not a picture.

Real compressions are kept where the pipeline depends on them: the VAE downsamples 8×
in space and 4× in time to 16 latent channels; the transformer patchifies (1, 2, 2) and
has the 1x/2x/4x clean-latent embedders and the SigLIP projection.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..conditioning import CLIP_MAX_TOKENS, PROMPT_TEMPLATE

LLAMA_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# Llama-3's pre-tokenizer split (contractions, letter runs, up to 3 digits, punctuation, spaces).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Text the tiny tokenizers learn their merges from: the template plus typical prompts, so
# the template prefix is a few dozen tokens instead of hundreds of bytes.
MERGE_CORPUS = PROMPT_TEMPLATE.replace("{}", "") + (
    " The girl dances gracefully, with clear movements, full of charm."
    " A character doing some simple body movements. The man walks in the rain, the camera follows him."
    " A cat sits on a table in the sunlight and looks at the camera."
)
LLAMA_MERGES = 400
CLIP_MERGES = 150

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,  # hidden_states[-3] must exist
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=CLIP_MAX_TOKENS,
    projection_dim=32,
    hidden_act="quick_gelu",
)
TINY_SIGLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=56,
    patch_size=14,  # 4×4 = 16 tokens (the real encoder: 384 / 14 → 27×27 = 729)
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
    up_block_types=("HunyuanVideoUpBlock3D",) * 4,
    block_out_channels=(16, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)
TINY_TRANSFORMER = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=TINY_LLAMA["hidden_size"],
    pooled_projection_dim=TINY_CLIP["hidden_size"],
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) for 128
    image_condition_type=None,
    has_image_proj=True,
    image_proj_dim=TINY_SIGLIP["hidden_size"],
    has_clean_x_embedder=True,
)
# Small enough that the tiny transformer is written as several shards + index json,
# like the public checkpoint, so the sharded loading path is what the tests exercise.
TRANSFORMER_SHARD_BYTES = 200_000
# The public repos store the encoders and VAE in fp16 and the transformer in bf16.
ENCODER_DTYPE = torch.float16
TRANSFORMER_DTYPE = torch.bfloat16


def write_tiny_bundle(out_dir: str | Path, seed: int = 0) -> Path:
    """Write all components under `out_dir` in the public layout; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llama_tokenizer = _write_llama_tokenizer(out / "tokenizer")
    clip_vocab = _write_clip_tokenizer(out / "tokenizer_2")
    # Each component gets its own seed, so one's weights do not depend on the others'.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_text_encoder(out / "text_encoder", llama_tokenizer)
        torch.manual_seed(seed + 1)
        _write_clip_text_encoder(out / "text_encoder_2", clip_vocab)
        torch.manual_seed(seed + 2)
        _write_vae(out / "vae")
        torch.manual_seed(seed + 3)
        _write_image_encoder(out / "image_encoder", out / "feature_extractor")
        torch.manual_seed(seed + 4)
        _write_transformer(out / "transformer")
        # The forward (F1) model: same architecture, its own weights.
        torch.manual_seed(seed + 5)
        _write_transformer(out / "transformer_f1")
    return out


# ---------------------------------------------------------------- tokenizers


def _learn_merges(words: Counter, count: int) -> list[tuple[str, str]]:
    """Plain byte-pair encoding: repeatedly merge the most frequent adjacent pair.

    Ties go to the smallest pair, so the merges (and the vocabulary) are the same on
    every run.
    """
    words = {tuple(word): freq for word, freq in words.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for symbols, freq in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge_pair(symbols, best): freq for symbols, freq in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _vocab_with_merges(base: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    tokens = base + [a + b for a, b in merges] + specials
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def _write_llama_tokenizer(folder: Path) -> Tokenizer:
    """A Llama-3 style byte-level BPE tokenizer (any UTF-8 text tokenizes)."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(MERGE_CORPUS))
    merges = _learn_merges(words, LLAMA_MERGES)
    vocab = _vocab_with_merges(_byte_alphabet(), merges, [])
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL_TOKENS])
    bos = LLAMA_SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"}
    # tokenizer_class: in transformers 5 `LlamaTokenizerFast` rebuilds a SentencePiece-style
    # pipeline and would mangle this byte-level tokenizer; the generic class keeps tokenizer.json.
    config = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
              "padding_side": "right", "clean_up_tokenization_spaces": True}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    return tokenizer


def _write_clip_tokenizer(folder: Path) -> dict[str, int]:
    """A CLIP-style BPE (byte alphabet, '</w>' word ends) as vocab.json + merges.txt; returns the vocab."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    base = alphabet + [c + "</w>" for c in alphabet]
    # Pre-tokenize with CLIPTokenizer's own normalizer and split, so the merges fit what it sees.
    reference = CLIPTokenizer(vocab={c: i for i, c in enumerate(base)}, merges=[])
    backend = reference.backend_tokenizer
    text = backend.normalizer.normalize_str(MERGE_CORPUS)
    words = Counter(
        (*piece[:-1], piece[-1] + "</w>") for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)
    )
    merges = _learn_merges(words, CLIP_MERGES)
    # Like the real CLIP vocab: bytes, bytes + '</w>', merges, then the two special tokens last.
    vocab = _vocab_with_merges(base, merges, [CLIP_BOS, CLIP_EOS])
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_TOKENS,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    return vocab


# ---------------------------------------------------------------- models


def _write_text_encoder(folder: Path, tokenizer: Tokenizer) -> None:
    from transformers import LlamaConfig, LlamaModel

    end_of_text = tokenizer.token_to_id("<|end_of_text|>")
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), bos_token_id=tokenizer.token_to_id("<|begin_of_text|>"),
        eos_token_id=end_of_text, pad_token_id=end_of_text, **TINY_LLAMA,
    )
    LlamaModel(config).to(ENCODER_DTYPE).save_pretrained(folder)


def _write_clip_text_encoder(folder: Path, vocab: dict[str, int]) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS],
                            pad_token_id=vocab[CLIP_EOS], **TINY_CLIP)
    CLIPTextModel(config).to(ENCODER_DTYPE).save_pretrained(folder)


def _write_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(**TINY_VAE)
    # nn.Module.to directly: diffusers' override warns about fp32-only modules even when there are none.
    torch.nn.Module.to(vae, ENCODER_DTYPE).save_pretrained(folder)


def _write_image_encoder(model_folder: Path, processor_folder: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).to(ENCODER_DTYPE).save_pretrained(model_folder)
    side = TINY_SIGLIP["image_size"]
    # The flux_redux_bfl preprocessor: bicubic resize to the square input, scale to [-1, 1].
    _write_json(
        processor_folder / "preprocessor_config.json",
        {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "SiglipProcessor",
            "do_convert_rgb": None,
            "do_resize": True,
            "size": {"height": side, "width": side},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )


def _write_transformer(folder: Path) -> None:
    from ..models.transformer import FramePackTransformer

    # save_pretrained writes config.json (diffusers keys) and the shards + index json.
    model = FramePackTransformer(**TINY_TRANSFORMER).to(TRANSFORMER_DTYPE)
    model.save_pretrained(folder, max_shard_bytes=TRANSFORMER_SHARD_BYTES)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model bundle into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line of output instead of a bar per file
    start = time.perf_counter()
    out = write_tiny_bundle(args.out_dir, seed=args.seed)
    print(f"wrote tiny model bundle to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
