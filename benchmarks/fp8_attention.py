"""FP8 attention's error against bf16: per forward and after a whole 25-step section.

The full 13B transformer (random weights scaled like benchmarks/transformer_forward.py,
its 640-bucket inputs) with the fused kernels runs four ways: bf16 linears or FP8
linears, each with exact attention (`sdpa`) or cuDNN's FP8 attention (`cudnn-fp8`).
For each it reports the seconds per forward (and the ratio to diffusers' eager forward of
the same weights, timed in the same run) and the relative error (L2) of

- one forward's output against the exact bf16 forward, and
- a whole section — UniPC over `--steps` steps from the same noise, as the engine
  samples one section — against the exact bf16 section,

so the cost of each approximation is read beside the time it saves.

    python benchmarks/fp8_attention.py [--steps 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from transformer_forward import (  # noqa: E402
    FULL_CONFIG,
    make_inputs,
    random_model,
    relative_error,
    time_forward,
    transformer_sharing_weights,
)

from framepack_backend.attention import Attend  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402
from framepack_backend.sampler import iterate_unipc  # noqa: E402
from framepack_backend.schedule import schedule_for  # noqa: E402

from results_file import save_result  # noqa: E402

VARIANTS = (("bf16", "sdpa"), ("bf16", "cudnn-fp8"), ("fp8", "sdpa"), ("fp8", "cudnn-fp8"))


def sample_section(model, inputs: dict, attend: Attend, steps: int) -> torch.Tensor:
    """One section's UniPC sampling from fixed noise, the way the engine runs it (fp32 solver, bf16 model)."""
    noise = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    _, _, frames, height, width = noise.shape
    sigmas = schedule_for(steps, frames, height, width)
    context = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    dtype = inputs["hidden_states"].dtype

    def flow(x: torch.Tensor, sigma: float, step_index: int) -> torch.Tensor:
        timestep = torch.full((1,), sigma * 1000.0, device=x.device, dtype=dtype)
        out = model(hidden_states=x.to(dtype), timestep=timestep, attend=attend, return_dict=False, **context)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    x0 = noise
    for _, x0 in iterate_unipc(flow, noise.to(inputs["hidden_states"].device), sigmas, model_dtype=dtype):
        pass
    return x0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("benchmarks/fp8_attention.py needs a Hopper or newer GPU")
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    device, dtype = torch.device("cuda"), torch.bfloat16
    source = random_model(HunyuanVideoFramepackTransformer3DModel, FULL_CONFIG, device, dtype, args.weight_scale)
    inputs = make_inputs(device, dtype)
    with torch.inference_mode():
        peer_s = time_forward(source, inputs, args.repeats)[0]
    print(f"diffusers eager: {peer_s:.4f} s/forward", flush=True)
    models = {}
    for precision in ("bf16", "fp8"):
        model = transformer_sharing_weights(FramePackTransformer, FULL_CONFIG, source)
        if precision == "fp8":
            model.quantize_fp8()
        model.set_fused_kernels(True)
        models[precision] = model
    del source

    rows = []
    with torch.inference_mode():
        reference_forward = reference_section = None
        for precision, backend in VARIANTS:
            model, attend = models[precision], Attend.named(backend)
            seconds, _, _, warmup_s, out = time_forward(model, dict(inputs, attend=attend), args.repeats)
            section = sample_section(model, inputs, attend, args.steps)
            if reference_forward is None:
                reference_forward, reference_section = out, section
            row = dict(linears=precision, attention=backend, forward_s=seconds, vs_diffusers_eager=peer_s / seconds,
                       warmup_s=warmup_s,
                       forward_rel_error=relative_error(out, reference_forward),
                       section_rel_error=relative_error(section, reference_section))
            rows.append(row)
            print(f"{precision} linears, {backend:9s} attention: {seconds:.4f} s/forward "
                  f"({row['vs_diffusers_eager']:.2f}x diffusers eager), "
                  f"rel. error forward {row['forward_rel_error']:.2e}, section {row['section_rel_error']:.2e}",
                  flush=True)
    save_result(args.out, "fp8_attention", "fp8_attention", steps=args.steps, diffusers_eager_s=peer_s, rows=rows,
                reference="bf16 linears, sdpa attention, fused kernels")


if __name__ == "__main__":
    main()
