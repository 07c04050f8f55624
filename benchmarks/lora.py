"""LoRA per request on the full 13B transformer (random weights): load, apply and remove
one rank-32 LoRA on every linear layer of the blocks, and the per-forward cost of each form
against no LoRA, same run, bf16 and FP8 (both on the fused kernels, the engine's default
on CUDA).

All three forms of framepack_backend/lora/apply.py are timed: `merged_once` (W ← W + B·A in
place once per job, undone exactly; the engine's form in memory mode resident), `merged`
(the layer runs on a fresh W + B·A per call; offload and stream) and `unmerged` (x·Aᵀ·Bᵀ
added to the output). FP8 layers are unmerged in all three (only the bf16 AdaLN
projections differ there). For `merged_once` the script also reports the exact undo's
correction: the fraction of weight elements it keeps and their bytes (lora/merge.py). That
fraction grows with the LoRA's change relative to the weights, so the factors are drawn
for an RMS change of `--delta-ratio` (default 2 %) of the adapted weights' RMS; the
timings do not depend on it. On a GPU it also reports the bytes each form holds and the
peak while applying it, beside what the memory planner counts for it (lora/footprint.py).

    python benchmarks/lora.py [--config full|small] [--rank 32] [--repeats 5] [--delta-ratio 0.02]
    python benchmarks/lora.py --tiny      # a few seconds on the CPU, to check the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformer_forward import FULL_CONFIG, SMALL_CONFIG, make_inputs, random_model

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.lora.apply import FORMS, float_layers_for, lora_targets, loras_applied  # noqa: E402
from framepack_backend.lora.folder import LoraFolder  # noqa: E402
from framepack_backend.lora.footprint import device_bytes  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402
from framepack_backend.testing.lora_files import diffusers_factors, hunyuan_factors, save_diffusers  # noqa: E402

# Same text, image and channel sizes as the full model (make_inputs builds for those), 256 wide, 2+2 blocks.
TINY_CONFIG = dict(FULL_CONFIG, num_attention_heads=2, num_layers=2, num_single_layers=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def fingerprint(weight: torch.Tensor) -> int:
    """A position-weighted sum of the weight's bit patterns: any changed element changes it."""
    bits = weight.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[weight.element_size()]).reshape(-1).long()
    return int((bits * torch.arange(1, bits.numel() + 1, device=bits.device)).sum())


def median_forward(model, inputs, device, repeats: int) -> float:
    model(**inputs)  # warm-up (kernels, autotuning)
    return statistics.median(timed(lambda: model(**inputs), device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("full", "small"), default="full")
    parser.add_argument("--tiny", action="store_true", help="a 256-wide 2+2-block model on the CPU in fp32")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--delta-ratio", type=float, default=0.02,
                        help="RMS of strength · B·A over RMS of the adapted weights (sets the factors' std)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.tiny:
        device, dtype, config, latent, text = torch.device("cpu"), torch.float32, TINY_CONFIG, (8, 8), 16
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/lora.py needs a CUDA GPU (or --tiny for the CPU)")
        device, dtype, latent, text = torch.device("cuda"), torch.bfloat16, (80, 80), 100
        config = FULL_CONFIG if args.config == "full" else SMALL_CONFIG
    model = random_model(FramePackTransformer, config, device, dtype, args.weight_scale)
    fused = device.type == "cuda"
    model.set_fused_kernels(fused)
    inputs = make_inputs(device, dtype, latent_hw=latent, text_tokens=text)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    rows: dict[str, float] = {}

    def report(name: str, seconds: float) -> None:
        rows[name] = seconds
        print(f"{name:40s} {seconds:9.4f} s", flush=True)

    with tempfile.TemporaryDirectory() as folder_path, torch.inference_mode():
        start = time.perf_counter()
        # RMS(Δ) = |s| · √rank · std² for alpha = rank and factors of one std.
        weight_rms = torch.stack([m.weight.float().pow(2).mean() for m in model.modules()
                                  if isinstance(m, torch.nn.Linear)]).mean().sqrt().item()
        std = (args.delta_ratio * weight_rms / (abs(args.strength) * args.rank**0.5)) ** 0.5
        factors = hunyuan_factors(dim, int(dim * config["mlp_ratio"]), config["num_layers"],
                                  config["num_single_layers"], args.rank, std=std)
        save_diffusers(Path(folder_path) / "bench.safetensors", diffusers_factors(factors, dim), alpha=args.rank)
        del factors
        print(f"wrote a rank-{args.rank} LoRA in {time.perf_counter() - start:.1f} s")
        folder = LoraFolder(folder_path)
        targets = lora_targets(model)
        report("load (read + check, cold cache)", timed(lambda: folder.load("bench", targets), device))
        report("load (cached)", timed(lambda: folder.load("bench", targets), device))
        lora = folder.load("bench", targets)
        print(f"{len(lora.layers)} adapted layers, {lora.nbytes / 2**20:.0f} MiB of fp32 factors on the host")

        def apply_remove(tag: str) -> None:
            """Each form's apply and remove; for merged_once, the correction's size and whether
            every adapted weight is bit-identical afterwards (fingerprints before and after)."""
            weights = [module.weight for name, module in model.named_modules() if name in lora.layers]
            counted = device_bytes(model, [(lora, args.strength)])  # what the memory planner counts
            for form in FORMS:
                before = [fingerprint(w) for w in weights]
                context = loras_applied(model, [(lora, args.strength)], device, dtype, form)
                sync(device)
                allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                adapted = context.__enter__()
                sync(device)
                report(f"{tag} {form} apply", time.perf_counter() - start)
                rows[f"{tag} {form} planner counts MiB"] = counted[form] / 2**20
                if device.type == "cuda":
                    held = torch.cuda.memory_allocated(device) - allocated
                    peak = torch.cuda.max_memory_allocated(device) - allocated
                    rows[f"{tag} {form} held MiB"], rows[f"{tag} {form} apply peak MiB"] = held / 2**20, peak / 2**20
                    print(f"{tag} {form}: holds {held / 2**20:.0f} MiB, {peak / 2**20:.0f} MiB at the peak of "
                          f"applying; the memory planner counts {counted[form] / 2**20:.0f} MiB", flush=True)
                report(f"{tag} {form} remove", timed(lambda: context.__exit__(None, None, None), device))
                exact = before == [fingerprint(w) for w in weights]
                rows[f"{tag} {form} weights bit-identical after remove"] = float(exact)
                if form == "merged_once" and adapted.merged_elements:
                    kept = adapted.kept_elements / adapted.merged_elements
                    rows[f"{tag} merged_once kept fraction"] = kept
                    rows[f"{tag} merged_once kept MiB"] = adapted.kept_bytes / 2**20
                    print(f"{tag} merged_once: the exact undo keeps {100 * kept:.2f} % of "
                          f"{adapted.merged_elements:,} weight elements ({adapted.kept_bytes / 2**20:.0f} MiB); "
                          f"weights bit-identical after remove: {exact}", flush=True)

        def overhead(tag: str, forms: tuple[str, ...]) -> None:
            """No LoRA before and after each form (the faster of the two is the base), same inputs."""
            base = median_forward(model, inputs, device, args.repeats)
            report(f"{tag} forward, no LoRA", base)
            for form in forms:
                with loras_applied(model, [(lora, args.strength)], device, dtype, form):
                    with_lora = median_forward(model, inputs, device, args.repeats)
                base = min(base, median_forward(model, inputs, device, args.repeats))
                report(f"{tag} forward, LoRA {form}", with_lora)
                rows[f"{tag} {form} overhead %"] = 100 * (with_lora / base - 1)
            rows[f"{tag} forward, no LoRA"] = base
            for form in forms:
                print(f"{tag} {form}: per-forward overhead {rows[f'{tag} {form} overhead %']:.1f} % "
                      f"(vs the best no-LoRA time, {base:.4f} s)", flush=True)

        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        apply_remove(tag)
        overhead(tag, FORMS)

        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
            model.quantize_fp8()  # the AdaLN projections stay bf16 and take each form
            apply_remove("fp8")
            overhead("fp8", FORMS)

    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"config={'tiny' if args.tiny else args.config}, rank {args.rank}, fused kernels {fused}")
    save_result(args.out, f"lora_{'tiny' if args.tiny else args.config}", "lora",
                config="tiny" if args.tiny else args.config, rank=args.rank, adapted_layers=len(lora.layers),
                factor_mib=lora.nbytes / 2**20, fused_kernels=fused,
                engine_float_layers={"resident": float_layers_for(True), "offload, stream": float_layers_for(False)},
                delta_ratio=args.delta_ratio, factor_std=std, weight_rms=weight_rms, rows=rows,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


if __name__ == "__main__":
    main()
