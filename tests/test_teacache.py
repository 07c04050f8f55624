import torch

from framepack_backend.teacache import RESCALE_COEFFICIENTS, TeaCache, rescaled_change


def run(cache: TeaCache, signals, branches=1):
    """Drive the cache like the sampler + transformer do; return the per-step decisions."""
    decisions = []
    for step, signal in enumerate(signals):
        cache.begin_step(step)
        for _ in range(branches):
            computed = cache.should_compute(signal)
            h = torch.zeros(3)
            if computed:
                cache.remember(h, h + 1)
            else:
                assert torch.equal(cache.apply_cached(h), h + 1)
        decisions.append(computed)
    return decisions


def slowly_changing(steps, rate=0.01):
    return [torch.full((4, 8), 1.0 + rate * i) for i in range(steps)]


def test_rescaled_change_is_the_polynomial_of_the_relative_l1():
    prev, cur = torch.full((10,), 2.0), torch.full((10,), 2.2)
    rel = 0.1
    expected = sum(c * rel ** (4 - i) for i, c in enumerate(RESCALE_COEFFICIENTS))
    assert abs(float(rescaled_change(cur, prev)) - expected) < 1e-4


def test_first_and_last_steps_always_compute_and_some_are_skipped():
    cache = TeaCache(0.15, steps=25)
    decisions = run(cache, slowly_changing(25))
    assert decisions[0] and decisions[-1]
    assert 2 <= sum(decisions) < 25
    assert cache.computed_steps == sum(decisions) and cache.skipped_steps == 25 - sum(decisions)


def test_steps_not_forward_calls_are_counted_with_cfg():
    plain, cfg = TeaCache(0.15, steps=25), TeaCache(0.15, steps=25)
    assert run(plain, slowly_changing(25)) == run(cfg, slowly_changing(25), branches=2)
    assert plain.computed_steps == cfg.computed_steps


def test_detail_mode_computes_at_least_as_many_steps():
    default, detail = TeaCache(0.15, steps=25), TeaCache(0.15, steps=25, detail=True)
    d0, d1 = run(default, slowly_changing(25)), run(detail, slowly_changing(25))
    assert sum(d1) >= sum(d0)
    assert all(d1[-6:])  # the final quarter is always computed


def test_disabled_computes_every_step():
    cache = TeaCache(0.15, steps=10, enabled=False)
    assert all(run(cache, slowly_changing(10)))


def test_reset_forgets_the_previous_section():
    cache = TeaCache(0.15, steps=5)
    run(cache, slowly_changing(5))
    cache.reset()
    cache.begin_step(1)  # even a middle step computes when there is no previous signal
    assert cache.should_compute(torch.ones(2))
