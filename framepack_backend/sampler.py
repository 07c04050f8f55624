"""UniPC flow-matching sampler and real classifier-free guidance (SPEC §6).

UniPC (Zhao et al. 2023, arXiv 2302.04867) in data-prediction form, with the
flow-matching adaptation FramePack uses: the model's flow v gives the x0 estimate
m = x - v·σ, and the exponential integrator runs in λ = -ln σ. Written from the
paper and SPEC §6.

The flow ODE dx/dσ = (x - m)/σ has the linear part x/σ, which the integrator
solves exactly; only the change of m along the path is approximated, by the last
k ≤ 3 estimates (predictor) and the fresh one (corrector). The corrector reuses the
next evaluation, so N steps cost exactly N model calls and σ = 0 is never evaluated:
the result is the last x0 estimate.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import GenerationCancelled

Variant = Literal["bh1", "bh2"]
VARIANTS: tuple[Variant, ...] = ("bh1", "bh2")
MAX_ORDER = 3

# flow_fn(x, sigma, step_index) -> flow prediction v, same shape as x.
FlowFn = Callable[[torch.Tensor, float, int], torch.Tensor]
# on_step(step_index, steps, x0_estimate), after every model evaluation.
StepCallback = Callable[[int, int, torch.Tensor], None]


def guided_flow(
    pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None, cfg: float, rescale: float = 0.0
) -> torch.Tensor:
    """Real CFG, uncond + cfg·(cond - uncond), in fp32, with std-ratio rescale.

    Rescale pulls the guided prediction's per-sample std back toward the conditional
    one (factor std(cond)/std(guided), blended by `rescale`), which counters the
    over-saturation large cfg causes. cfg == 1 is the conditional prediction alone
    (the uncond branch need not be computed at all).
    """
    cond = pred_cond.float()
    if cfg == 1.0:
        return cond
    if pred_uncond is None:
        raise ValueError(f"pred_uncond is required when cfg != 1 (cfg={cfg})")
    guided = pred_uncond.float() + cfg * (cond - pred_uncond.float())
    if rescale == 0.0:
        return guided
    sample_dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=sample_dims, keepdim=True) / guided.std(dim=sample_dims, keepdim=True)
    return guided * (rescale * ratio + (1.0 - rescale))


@dataclass(frozen=True)
class UniPCWeights:
    """Scalars for one UniPC step from s_0 (newest evaluated sigma) to t."""

    phi: float  # expm1(-h): x̃ = (t/s_0)·x - phi·m_0 is the exact step for constant m
    b_h: float  # B(h): -h for bh1, expm1(-h) for bh2
    ratios: tuple[float, ...]  # r_j = (λ(s_j) - λ(s_0))/h for the older estimates j = 1..k-1
    predictor: tuple[float, ...]  # ρ_p, one per older estimate
    corrector: tuple[float, ...]  # ρ_c, one per older estimate, then the weight of m_t


def unipc_weights(sigmas_newest_first: Sequence[float], t: float, variant: Variant = "bh1") -> UniPCWeights:
    """Weights for a step of order k = len(sigmas_newest_first) to the noise level t."""
    k = len(sigmas_newest_first)
    lam_0 = -math.log(sigmas_newest_first[0])
    h = -math.log(t) - lam_0
    h_neg = -h
    phi = math.expm1(h_neg)
    b_h = h_neg if variant == "bh1" else math.expm1(h_neg)
    ratios = [(-math.log(s) - lam_0) / h for s in sigmas_newest_first[1:]]

    # Order conditions R·ρ = b: row n of R is r^(n-1); b_n = n!·g_n/B(h) with
    # g_1 = φ/ĥ - 1 and g_{n+1} = g_n/ĥ - 1/(n+1)! (the φ-function terms of UniPC).
    r = torch.tensor([*ratios, 1.0], dtype=torch.float64)
    rows, rhs = [], []
    g, factorial = phi / h_neg - 1.0, 1.0
    for n in range(1, k + 1):
        rows.append(r ** (n - 1))
        rhs.append(g * factorial / b_h)
        factorial *= n + 1
        g = g / h_neg - 1.0 / factorial
    big_r, b = torch.stack(rows), torch.tensor(rhs, dtype=torch.float64)

    # Lowest orders use the fixed weight 0.5 (UniP-2 predictor, UniC-1 corrector)
    # instead of solving, as SPEC §6 and the reference do.
    if k == 1:
        predictor: list[float] = []
    elif k == 2:
        predictor = [0.5]
    else:
        predictor = torch.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
    corrector = [0.5] if k == 1 else torch.linalg.solve(big_r, b).tolist()
    return UniPCWeights(phi, b_h, tuple(ratios), tuple(predictor), tuple(corrector))


def _noise_levels(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(levels) < 2:
        raise ValueError(f"sigmas must hold steps + 1 >= 2 values, got {len(levels)}")
    if not all(math.isfinite(s) for s in levels) or any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sigmas must be finite and strictly decreasing, got {levels}")
    if levels[-2] <= 0.0:
        raise ValueError(f"sigmas before the last must be > 0 (they are evaluated), got {levels}")
    return levels


def _weighted_sum(weights: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = weights[0] * tensors[0]
    for w, d in zip(weights[1:], tensors[1:]):
        total = total + w * d
    return total


def iterate_unipc(
    flow_fn: FlowFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    variant: Variant = "bh1",
    cancel: Callable[[], bool] | None = None,
    model_dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Integrate the flow ODE from `noise` at sigmas[0], yielding (step_index, x0 estimate).

    One item per model evaluation, len(sigmas) - 1 in all; the last x0 estimate is the
    result. Runs in fp32 (fp64 if `noise` is fp64). `cancel` is polled before every
    model evaluation; when it returns True, GenerationCancelled is raised. Bad
    arguments raise here, before anything is evaluated.

    `model_dtype` is the precision the model reads x in (bf16 for a bf16 transformer).
    The x0 estimate then subtracts the flow from x rounded to it, m = x̃ - v·σ, as the
    FramePack demo's flow wrapper does: the model predicts the flow of the x it saw.
    None (or a dtype at least as wide as the solver's) leaves x as it is.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return _unipc_steps(flow_fn, noise, _noise_levels(sigmas), variant, cancel, model_dtype)


def _unipc_steps(
    flow_fn: FlowFn,
    noise: torch.Tensor,
    levels: list[float],
    variant: Variant,
    cancel: Callable[[], bool] | None,
    model_dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    steps = len(levels) - 1
    max_order = max(min(MAX_ORDER, steps - 1), 1)
    dtype = torch.promote_types(noise.dtype, torch.float32)
    rounds_input = model_dtype is not None and torch.promote_types(model_dtype, dtype) == dtype and model_dtype != dtype

    def x0_estimate(x: torch.Tensor, sigma: float, step_index: int) -> torch.Tensor:
        if cancel is not None and cancel():
            raise GenerationCancelled(f"cancelled before model evaluation {step_index + 1} of {steps}")
        seen = x.to(model_dtype).to(dtype) if rounds_input else x
        return seen - flow_fn(x, sigma, step_index).to(dtype) * sigma

    x = noise.to(dtype)
    estimates = [x0_estimate(x, levels[0], 0)]  # newest first, at most max_order kept
    times = [levels[0]]
    yield 0, estimates[0]
    for i in range(1, steps):
        t = levels[i]
        w = unipc_weights(times, t, variant)
        m_0 = estimates[0]
        diffs = [(m_j - m_0) / r_j for m_j, r_j in zip(estimates[1:], w.ratios)]

        x_base = (t / times[0]) * x - w.phi * m_0
        x_pred = x_base - w.b_h * _weighted_sum(w.predictor, diffs) if w.predictor else x_base
        m_t = x0_estimate(x_pred, t, i)
        correction = w.corrector[-1] * (m_t - m_0)
        if diffs:
            correction = correction + _weighted_sum(w.corrector[:-1], diffs)
        x = x_base - w.b_h * correction

        estimates.insert(0, m_t)
        times.insert(0, t)
        del estimates[max_order:], times[max_order:]
        yield i, m_t


def sample_unipc(
    flow_fn: FlowFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    variant: Variant = "bh1",
    on_step: StepCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """`iterate_unipc` run to the end: returns the final x0 estimate, calling
    on_step(step_index, steps, x0_estimate) after every model evaluation."""
    steps = len(sigmas) - 1
    x0 = noise
    for step_index, x0 in iterate_unipc(flow_fn, noise, sigmas, variant, cancel):
        if on_step is not None:
            on_step(step_index, steps, x0)
    return x0
