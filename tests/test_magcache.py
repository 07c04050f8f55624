"""MagCache: the skip decisions equal the authors' FramePack loop for the same ratio tables,
per sampling step with CFG, on the tiny model end to end, and through the settings."""

import itertools
import math

import numpy as np
import pytest
import torch

from framepack_backend.events import StepProgress
from framepack_backend.magcache import MAGNITUDE_RATIOS, MagCache, magcache_schedule, magnitude_ratio
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SamplingSettings, SettingsError
from framepack_backend.step_cache import step_cache_for, step_cache_name
from framepack_backend.teacache import TeaCache
from framepack_backend.variants import SamplingVariant


class AuthorsLoop:
    """The decision part of MagCache4FramePack (`initialize_magcache` + `magcache_framepack_forward`),
    restated as that loop runs: one counter per forward call, wrapping after num_steps."""

    def __init__(self, mag_ratios, num_steps, magcache_thresh, K, retention_ratio):
        self.cnt = 0
        self.num_steps = num_steps
        self.magcache_thresh = magcache_thresh
        self.K = K
        self.retention_ratio = retention_ratio
        self.mag_ratios = np.array(mag_ratios)
        if len(self.mag_ratios) != num_steps:
            if num_steps == 1:
                self.mag_ratios = np.array([self.mag_ratios[-1]])
            else:
                scale = (len(self.mag_ratios) - 1) / (num_steps - 1)
                self.mag_ratios = self.mag_ratios[np.round(np.arange(num_steps) * scale).astype(int)]

    def forward_skips(self) -> bool:
        if self.cnt == 0:
            self.accumulated_ratio = 1.0
            self.accumulated_steps = 0
            self.accumulated_err = 0
        skip_forward = False
        if self.cnt >= int(self.retention_ratio * self.num_steps) and self.cnt >= 1:
            cur_mag_ratio = self.mag_ratios[self.cnt]
            self.accumulated_ratio = self.accumulated_ratio * cur_mag_ratio
            self.accumulated_err += np.abs(1 - self.accumulated_ratio)
            self.accumulated_steps += 1
            if (self.accumulated_err <= self.magcache_thresh and self.accumulated_steps <= self.K
                    and np.abs(1 - cur_mag_ratio) <= 0.06):
                skip_forward = True
            else:
                self.accumulated_ratio = 1.0
                self.accumulated_steps = 0
                self.accumulated_err = 0
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        return skip_forward


def authors_computed(ratios, steps, threshold, k, retention, sections=1):
    loop = AuthorsLoop(ratios, steps, threshold, k, retention)
    return [not loop.forward_skips() for _ in range(steps * sections)]


def drive(cache, steps, branches=1):
    """Run a cache the way the sampler and transformer do; the computed flags and the residuals used."""
    decisions = []
    for step in range(steps):
        cache.begin_step(step)
        for branch in range(branches):
            h = torch.full((3,), float(step))
            if cache.should_compute(None):
                cache.remember(h, h + 10 * step + branch)
                computed = True
            else:
                # The residual of this branch's last computed step, never the other branch's.
                assert float(cache.apply_cached(h)[0] - h[0]) % 10 == branch
                computed = False
            if branch == 0:
                decisions.append(computed)
    return decisions


TABLES = [MAGNITUDE_RATIOS[v] for v in SamplingVariant]


@pytest.mark.parametrize("table", range(len(TABLES)))
def test_schedule_equals_the_authors_loop_over_settings_and_step_counts(table):
    ratios = TABLES[table]
    grid = itertools.product(range(1, 61), (0.0, 0.05, 0.1, 0.15, 0.3, 1.0), range(0, 6), (0.0, 0.1, 0.2, 0.25, 1.0))
    for steps, threshold, k, retention in grid:
        assert list(magcache_schedule(ratios, steps, threshold, k, retention)) == authors_computed(
            ratios, steps, threshold, k, retention), (steps, threshold, k, retention)


def test_schedule_equals_the_authors_loop_for_random_ratio_tables():
    rng = np.random.default_rng(0)
    for trial in range(300):
        ratios = [1.0, *(1.0 + rng.normal(0.0, 0.04, size=int(rng.integers(4, 40))))]
        steps = int(rng.integers(1, 50))
        threshold, k, retention = float(rng.uniform(0, 0.4)), int(rng.integers(0, 6)), float(rng.uniform(0, 0.5))
        assert list(magcache_schedule(ratios, steps, threshold, k, retention)) == authors_computed(
            ratios, steps, threshold, k, retention), trial


def test_authors_defaults_compute_about_half_the_steps():
    # E010K3R02 at 25 steps: the first 5 kept, then at most 3 skips in a row; the ratio 0.789
    # of the last step is far from 1, so it is computed.
    for variant in SamplingVariant:
        schedule = magcache_schedule(MAGNITUDE_RATIOS[variant], 25, 0.1, 3, 0.2)
        assert all(schedule[:5]) and schedule[-1]
        assert sum(schedule) == 12
        longest_skip = max(len(run) for run in "".join("C" if c else "." for c in schedule).split("C"))
        assert longest_skip <= 3
    assert all(magcache_schedule(MAGNITUDE_RATIOS[SamplingVariant.INVERTED], 25, 0.1, 0, 0.2))  # K = 0: no skips


def test_cache_follows_the_schedule_per_step_with_cfg_and_restarts_each_section():
    plain = MagCache.for_variant("inverted", 25, 0.1, 3, 0.2)
    cfg = MagCache.for_variant("inverted", 25, 0.1, 3, 0.2)
    first = drive(plain, 25)
    assert first == list(plain.schedule)
    assert drive(cfg, 25, branches=2) == first  # two forward calls per step, one decision
    plain.reset()
    assert drive(plain, 25) == first
    # The authors' loop over the same two sections (its counter wraps at num_steps).
    assert first * 2 == authors_computed(MAGNITUDE_RATIOS[SamplingVariant.INVERTED], 25, 0.1, 3, 0.2, sections=2)
    assert (plain.computed_steps, plain.skipped_steps) == (24, 26)
    assert (cfg.computed_steps, cfg.skipped_steps) == (12, 13)


def test_magnitude_ratio_is_the_mean_token_norm_ratio():
    previous = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # token norms 5, 1
    current = torch.tensor([[[6.0, 8.0], [0.0, 3.0]]])  # token norms 10, 3
    assert math.isclose(float(magnitude_ratio(current, previous)), (2.0 + 3.0) / 2)


def test_settings_choose_the_cache_and_keep_teacache_working():
    defaults = SamplingSettings()
    assert (defaults.cache, step_cache_name(defaults)) == ("teacache", "teacache")  # the demo's default
    assert (defaults.magcache_threshold, defaults.magcache_max_skips, defaults.magcache_retention) == (0.1, 3, 0.2)
    assert step_cache_name(SamplingSettings.from_mapping({"teacache": "off"})) == "none"
    assert step_cache_name(SamplingSettings.from_mapping({"cache": "none"})) == "none"
    chosen = SamplingSettings.from_mapping({"cache": "magcache", "preset": "Dance", "steps": "25",
                                            "magcache_threshold": "0.15", "magcache_max_skips": "4"})
    assert step_cache_name(chosen) == "magcache"  # Dance turns TeaCache off, not the chosen cache
    f1 = step_cache_for(chosen, SamplingVariant.F1)
    assert isinstance(f1, MagCache)
    assert f1.schedule == magcache_schedule(MAGNITUDE_RATIOS[SamplingVariant.F1], 25, 0.15, 4, 0.2)
    assert step_cache_for(chosen, SamplingVariant.INVERTED).schedule != f1.schedule
    teacache = step_cache_for(SamplingSettings(), SamplingVariant.INVERTED)
    assert isinstance(teacache, TeaCache) and teacache.enabled
    with pytest.raises(SettingsError, match="cache='fastest'.*'teacache', 'magcache', 'none'"):
        SamplingSettings.from_mapping({"cache": "fastest"})
    with pytest.raises(SettingsError, match="magcache_max_skips"):
        SamplingSettings.from_mapping({"magcache_max_skips": -1})


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    return Pipeline.from_pretrained(tiny_bundle, device="cpu")


def test_tiny_model_skips_the_scheduled_steps_and_reuses_the_residual(pipeline, image):
    settings = {"resolution": 128, "steps": 25, "seconds": 1, "cache": "magcache", "preview": False}
    events = list(pipeline.generate(GenerationRequest.parse(image, "a robot waves", **settings)))
    steps = [e for e in events if isinstance(e, StepProgress)]
    expected = magcache_schedule(MAGNITUDE_RATIOS[SamplingVariant.INVERTED], 25, 0.1, 3, 0.2)
    sections = steps[-1].sections
    assert [s.computed for s in steps] == list(expected) * sections
    result = events[-1]
    assert result.timings["computed_steps"] == 12 * sections
    assert result.settings["cache"] == "magcache" and np.isfinite(result.frames).all()


def test_a_skipped_forward_adds_the_cached_residual(pipeline):
    """Same inputs on a computed then a skipped step: the skipped step's output is the computed one."""
    transformer = pipeline.components.transformer
    g = torch.Generator().manual_seed(0)
    config = transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, config.in_channels, 2, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, config.text_embed_dim, generator=g),
        encoder_attention_mask=None,
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        image_embeds=None,
        indices_latents=torch.arange(2),
        guidance=torch.tensor([10000.0]),
    )
    cache = MagCache([1.0, 1.0, 1.0], steps=3, threshold=0.1, max_skips=3, retention=0.0)
    assert cache.schedule == (True, False, False)
    outputs = []
    with torch.inference_mode():
        for step in range(3):
            cache.begin_step(step)
            outputs.append(transformer(**inputs, teacache=cache))
        plain = transformer(**inputs)
    assert (cache.computed_steps, cache.skipped_steps) == (1, 2)
    assert torch.allclose(outputs[0], plain, atol=1e-6, rtol=0)
    for skipped in outputs[1:]:
        assert (skipped - outputs[0]).abs().max() < 1e-5
