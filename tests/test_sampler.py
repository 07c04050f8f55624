import math

import pytest
import torch

from framepack_backend.errors import GenerationCancelled
from framepack_backend.sampler import guided_flow, iterate_unipc, sample_unipc, unipc_weights
from framepack_backend.schedule import schedule_for


class GaussianFlow:
    """Exact flow for data x0 ~ N(mean, std²) per element, with x_σ = (1-σ)·x0 + σ·ε.

    The posterior mean is E[x0 | x_σ] = mean + (1-σ)·std²/V(σ)·(x - (1-σ)·mean) with
    V(σ) = (1-σ)²·std² + σ², and the flow is v = (x - E[x0 | x])/σ. The probability-flow
    ODE keeps z = (x - (1-σ)·mean)/√V(σ) constant, so from x = ε at σ = 1 the exact x0
    estimate at σ is mean + (1-σ)·std²/√V(σ)·ε.
    """

    def __init__(self, n: int = 2048, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mean = 0.5 * torch.randn(n, dtype=torch.float64, generator=g)
        self.std = 0.2 + 0.8 * torch.rand(n, dtype=torch.float64, generator=g)
        self.noise = torch.randn(n, dtype=torch.float64, generator=g)
        self.calls: list[tuple[float, int]] = []

    def _variance(self, sigma: float) -> torch.Tensor:
        return (1 - sigma) ** 2 * self.std**2 + sigma**2

    def __call__(self, x: torch.Tensor, sigma: float, step_index: int) -> torch.Tensor:
        self.calls.append((sigma, step_index))
        x = x.double()
        x0 = self.mean + (1 - sigma) * self.std**2 / self._variance(sigma) * (x - (1 - sigma) * self.mean)
        return (x - x0) / sigma

    def exact_x0_estimate(self, sigma: float) -> torch.Tensor:
        return self.mean + (1 - sigma) * self.std**2 / self._variance(sigma).sqrt() * self.noise


def euler(flow: GaussianFlow, sigmas: torch.Tensor) -> torch.Tensor:
    """First-order baseline under the same contract: N evaluations, return the last x0 estimate."""
    levels = sigmas.tolist()
    x = flow.noise.clone()
    for i in range(len(levels) - 2):
        x = x + (levels[i + 1] - levels[i]) * flow(x, levels[i], i)
    last = levels[-2]
    return x - flow(x, last, len(levels) - 2) * last


def relative_rms(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


# The production schedule: 25 steps, shift 7 (mu capped at ln 7, 640 bucket, window 9).
DEFAULT_SIGMAS = schedule_for(25, 9, 76, 80)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_point_data_reaches_the_point_exactly(variant):
    # Data = one point per element: the x0 estimate is constant along the path, which
    # the exponential integrator handles exactly, so any step count lands on the data.
    g = torch.Generator().manual_seed(1)
    point, noise = torch.randn(64, dtype=torch.float64, generator=g), torch.randn(64, dtype=torch.float64, generator=g)
    result = sample_unipc(lambda x, s, i: (x - point) / s, noise, DEFAULT_SIGMAS, variant)
    assert (result - point).abs().max().item() < 1e-12


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_gaussian_toy_reaches_analytic_x0_at_25_steps(variant):
    # The result is the x0 estimate at the last evaluated sigma, 7/31 here, so the
    # analytic target is the exact posterior mean there on the exact ODE path.
    # Tolerance: relative RMS error 2e-2 (measured 8.9e-3 for both variants).
    flow = GaussianFlow()
    result = sample_unipc(flow, flow.noise, DEFAULT_SIGMAS, variant)
    exact = flow.exact_x0_estimate(DEFAULT_SIGMAS[-2].item())
    assert DEFAULT_SIGMAS[-2].item() == pytest.approx(7 / 31)
    assert result.dtype == torch.float64
    assert relative_rms(result, exact) < 2e-2


def test_unipc_beats_euler_at_25_steps():
    # Same schedule, same number of evaluations: Euler measured 7.3e-2, UniPC 8.9e-3.
    flow = GaussianFlow()
    exact = flow.exact_x0_estimate(DEFAULT_SIGMAS[-2].item())
    unipc_error = relative_rms(sample_unipc(flow, flow.noise, DEFAULT_SIGMAS), exact)
    euler_error = relative_rms(euler(flow, DEFAULT_SIGMAS), exact)
    assert unipc_error < euler_error / 5


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_high_order_convergence_on_a_fixed_interval(variant):
    # Sigmas uniform on [1, 0.2] then 0, so the target is the same for every N. Doubling
    # N divides the error by 2^p; UniPC-3 with its corrector is order 4 (measured ≈ 15x),
    # Euler order 1 (≈ 2x). Require at least 8x, i.e. better than second order.
    flow = GaussianFlow()
    exact = flow.exact_x0_estimate(0.2)

    def sigmas(n: int) -> torch.Tensor:
        return torch.cat([torch.linspace(1, 0.2, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])

    errors = [relative_rms(sample_unipc(flow, flow.noise, sigmas(n), variant), exact) for n in (10, 20, 40)]
    assert errors[0] / errors[1] > 8 and errors[1] / errors[2] > 8
    euler_errors = [relative_rms(euler(flow, sigmas(n)), exact) for n in (20, 40)]
    assert 1.7 < euler_errors[0] / euler_errors[1] < 2.3
    assert errors[2] < euler_errors[1] / 100  # measured ≈ 580x at 40 steps


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 25])
def test_one_model_call_per_step_and_sigma_zero_never_evaluated(steps):
    flow = GaussianFlow(n=8)
    sigmas = schedule_for(steps, 9, 76, 80)
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    sample_unipc(flow, flow.noise, sigmas, on_step=lambda i, n, x0: seen.append((i, n, tuple(x0.shape))))
    assert len(flow.calls) == steps
    assert [i for _, i in flow.calls] == list(range(steps))
    assert [s for s, _ in flow.calls] == pytest.approx(sigmas[:-1].tolist(), abs=0)
    assert all(s > 0 for s, _ in flow.calls)
    assert seen == [(i, steps, (8,)) for i in range(steps)]


def test_on_step_receives_the_returned_estimate_last():
    flow = GaussianFlow(n=16)
    estimates: list[torch.Tensor] = []
    result = sample_unipc(flow, flow.noise, DEFAULT_SIGMAS, on_step=lambda i, n, x0: estimates.append(x0))
    assert torch.equal(estimates[-1], result)


def test_iterate_yields_every_estimate_and_the_result_last():
    flow = GaussianFlow(n=16)
    items = list(iterate_unipc(flow, flow.noise, DEFAULT_SIGMAS, "bh2"))
    assert [i for i, _ in items] == list(range(25))
    assert torch.equal(items[-1][1], sample_unipc(flow, flow.noise, DEFAULT_SIGMAS, "bh2"))


def test_iterate_rejects_bad_arguments_before_any_evaluation():
    flow = GaussianFlow(n=4)
    with pytest.raises(ValueError, match="variant"):
        iterate_unipc(flow, flow.noise, DEFAULT_SIGMAS, "bh3")
    with pytest.raises(ValueError, match="decreasing"):
        iterate_unipc(flow, flow.noise, torch.tensor([1.0, 1.0, 0.0]))
    assert flow.calls == []


def test_fp32_by_default_and_close_to_fp64():
    flow = GaussianFlow(n=256)
    reference = sample_unipc(flow, flow.noise, DEFAULT_SIGMAS)
    result = sample_unipc(lambda x, s, i: flow(x, s, i).float(), flow.noise.half(), DEFAULT_SIGMAS)
    assert result.dtype == torch.float32
    # fp16 noise is rounded once at the start (~5e-4 relative); the rest runs in fp32.
    assert (result.double() - reference).abs().max().item() < 1e-2


def test_cancel_raises_before_the_next_evaluation():
    flow = GaussianFlow(n=8)
    polls = []

    def cancel() -> bool:
        polls.append(len(flow.calls))
        return len(polls) > 3

    with pytest.raises(GenerationCancelled, match="4 of 25"):
        sample_unipc(flow, flow.noise, DEFAULT_SIGMAS, cancel=cancel)
    assert len(flow.calls) == 3
    assert polls == [0, 1, 2, 3]


def test_weights_low_orders_use_the_fixed_half():
    first = unipc_weights([0.9], 0.8, "bh1")
    h = math.log(0.9 / 0.8)
    assert first.phi == pytest.approx(math.expm1(-h), abs=1e-15)
    assert first.b_h == pytest.approx(-h, abs=1e-15)
    assert first.predictor == () and first.corrector == (0.5,)
    second = unipc_weights([0.8, 0.9], 0.7, "bh2")
    assert second.b_h == pytest.approx(math.expm1(-math.log(0.8 / 0.7)), abs=1e-15)
    assert second.ratios == pytest.approx((math.log(0.8 / 0.9) / math.log(0.8 / 0.7),), abs=1e-15)
    assert second.predictor == (0.5,) and len(second.corrector) == 2


def test_weights_order_three_solve_the_order_conditions():
    w = unipc_weights([0.5, 0.6, 0.7], 0.4, "bh1")
    h_neg = -math.log(0.5 / 0.4)
    g1 = math.expm1(h_neg) / h_neg - 1
    g2 = g1 / h_neg - 1 / 2
    b = [g1 / h_neg, 2 * g2 / h_neg]
    r = [*w.ratios, 1.0]
    # corrector: Σρ_j = b_1 and Σρ_j·r_j = b_2 (plus a third row); predictor the 2x2 version
    assert sum(w.corrector) == pytest.approx(b[0], abs=1e-12)
    assert sum(c * rj for c, rj in zip(w.corrector, r)) == pytest.approx(b[1], abs=1e-12)
    assert sum(w.predictor) == pytest.approx(b[0], abs=1e-12)
    assert sum(p * rj for p, rj in zip(w.predictor, w.ratios)) == pytest.approx(b[1], abs=1e-12)


@pytest.mark.parametrize(
    "sigmas,match",
    [([1.0], "steps \\+ 1"), ([1.0, 0.5, 0.7, 0.0], "decreasing"), ([1.0, 0.0, -0.1], "> 0")],
)
def test_bad_sigmas_are_rejected(sigmas, match):
    with pytest.raises(ValueError, match=match):
        sample_unipc(lambda x, s, i: x, torch.zeros(2), torch.tensor(sigmas))


def test_bad_variant_is_rejected():
    with pytest.raises(ValueError, match="bh3"):
        sample_unipc(lambda x, s, i: x, torch.zeros(2), DEFAULT_SIGMAS, variant="bh3")


def test_cfg_one_is_the_conditional_prediction():
    cond = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float16)
    result = guided_flow(cond, None, cfg=1.0, rescale=0.7)
    assert result.dtype == torch.float32
    assert torch.equal(result, cond.float())


def test_plain_cfg_by_hand():
    cond = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    uncond = torch.tensor([[0.5, 0.0, 1.0, -1.0]])
    expected = torch.tensor([[2.0, 6.0, 7.0, 14.0]])  # uncond + 3·(cond - uncond)
    assert torch.allclose(guided_flow(cond, uncond, cfg=3.0, rescale=0.0), expected, atol=1e-6)


def test_rescale_blends_toward_the_conditional_std_per_sample():
    cond = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 1.0, -1.0]])
    uncond = torch.zeros(2, 4)
    # guided = 3·cond, so std(cond)/std(guided) = 1/3 for each sample:
    # rs = 1 gives cond back, rs = 0.5 gives (1/2·1/3 + 1/2)·3·cond = 2·cond.
    assert torch.allclose(guided_flow(cond, uncond, cfg=3.0, rescale=1.0), cond, atol=1e-6)
    assert torch.allclose(guided_flow(cond, uncond, cfg=3.0, rescale=0.5), 2 * cond, atol=1e-6)


def test_rescale_with_offset_uncond_by_hand():
    cond = torch.tensor([[0.0, 2.0]])
    uncond = torch.tensor([[1.0, 1.0]])
    # guided = [1 - 2, 1 + 2] = [-1, 3]; std(cond) = √2, std(guided) = 2√2 -> ratio 1/2
    result = guided_flow(cond, uncond, cfg=2.0, rescale=1.0)
    assert torch.allclose(result, torch.tensor([[-0.5, 1.5]]), atol=1e-6)


def test_cfg_without_uncond_names_the_field():
    with pytest.raises(ValueError, match="pred_uncond"):
        guided_flow(torch.ones(1, 2), None, cfg=2.0)


def test_x0_is_taken_from_x_in_the_model_precision_as_the_framepack_demo_does():
    """A bf16 model sees x rounded to bf16 and predicts the flow of that x: m = bf16(x) - v·σ."""
    torch.manual_seed(0)
    noise = torch.randn(1, 4, 2, 8, 8)
    sigmas = [1.0, 0.5, 0.0]

    def flow(x, sigma, step_index):
        return 0.25 * x.to(torch.bfloat16).float()

    _, x0 = next(iterate_unipc(flow, noise, sigmas, model_dtype=torch.bfloat16))
    rounded = noise.to(torch.bfloat16).float()
    assert torch.equal(x0, rounded - flow(noise, 1.0, 0) * 1.0)
    _, plain = next(iterate_unipc(flow, noise, sigmas))
    assert not torch.equal(x0, plain) and torch.equal(plain, noise - flow(noise, 1.0, 0))
    for same in (None, torch.float32, torch.float64):  # no narrower than the solver: x as it is
        assert torch.equal(next(iterate_unipc(flow, noise, sigmas, model_dtype=same))[1], plain)
