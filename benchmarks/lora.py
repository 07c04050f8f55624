"""LoRA per request on the full 13B transformer (random weights): load, apply and remove
one rank-32 LoRA on every linear layer of the blocks, and the per-forward cost of its
low-rank path against no LoRA, same run, bf16 and FP8 (both on the fused kernels, the
engine's default on CUDA).

Both per-call forms of framepack_backend/lora/apply.py are timed: `unmerged` (x·Aᵀ·Bᵀ
added to the output) and `merged` (the layer runs on a fresh W + B·A); FP8 layers are
unmerged in both (only the bf16 AdaLN projections differ there). FLOAT_LAYERS there is
the engine's choice; these numbers decide it. For reference the script also times a
merge once per job where one is possible at all (bf16, resident): W += s·B·A over the
same layers with a copy of W kept, then the exact restore from that copy.

    python benchmarks/lora.py [--config full|small] [--rank 32] [--repeats 5]
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
from transformer_forward import FULL_CONFIG, SMALL_CONFIG, make_inputs

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.lora.apply import FLOAT_LAYERS, FORMS, lora_targets, loras_applied  # noqa: E402
from framepack_backend.lora.folder import LoraFolder  # noqa: E402
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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.tiny:
        device, dtype, config, latent, text = torch.device("cpu"), torch.float32, TINY_CONFIG, (8, 8), 16
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/lora.py needs a CUDA GPU (or --tiny for the CPU)")
        device, dtype, latent, text = torch.device("cuda"), torch.bfloat16, (80, 80), 100
        config = FULL_CONFIG if args.config == "full" else SMALL_CONFIG
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = FramePackTransformer(**config).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(args.weight_scale)
    fused = device.type == "cuda"
    model.set_fused_kernels(fused)
    inputs = make_inputs(device, dtype, latent_hw=latent, text_tokens=text)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    rows: dict[str, float] = {}

    def report(name: str, seconds: float) -> None:
        rows[name] = seconds
        print(f"{name:44s} {seconds:9.4f} s", flush=True)

    with tempfile.TemporaryDirectory() as folder_path, torch.inference_mode():
        start = time.perf_counter()
        factors = hunyuan_factors(dim, int(dim * config["mlp_ratio"]), config["num_layers"],
                                  config["num_single_layers"], args.rank, std=0.01)
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
            context = loras_applied(model, [(lora, args.strength)], device, dtype)
            report(f"{tag} apply (factors to the device, hooks)", timed(context.__enter__, device))
            report(f"{tag} remove", timed(lambda: context.__exit__(None, None, None), device))

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

        # A merge, for comparison: keep W, add s·B·A in place, restore W exactly.
        modules = dict(model.named_modules())

        def merge_and_restore() -> None:
            kept = []
            for name, layer in lora.layers.items():
                weight = modules[name].weight
                kept.append((weight, weight.clone()))
                weight.addmm_(layer.up.to(device, dtype), layer.down.to(device, dtype), alpha=args.strength)
            for weight, original in kept:
                weight.copy_(original)

        report(f"{tag} merge + exact restore (resident only)", timed(merge_and_restore, device))

        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
            model.quantize_fp8()  # the AdaLN projections stay bf16 and take FLOAT_LAYERS' form
            apply_remove("fp8")
            overhead("fp8", FORMS)

    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"config={'tiny' if args.tiny else args.config}, rank {args.rank}, fused kernels {fused}")
    save_result(args.out, f"lora_{'tiny' if args.tiny else args.config}", "lora",
                config="tiny" if args.tiny else args.config, rank=args.rank, adapted_layers=len(lora.layers),
                factor_mib=lora.nbytes / 2**20, fused_kernels=fused, engine_float_layers=FLOAT_LAYERS, rows=rows,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


if __name__ == "__main__":
    main()
