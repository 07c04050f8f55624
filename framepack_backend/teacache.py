"""TeaCache: skip the transformer blocks on steps where their input barely changed.

The signal is the AdaLN-modulated input of the first dual-stream block. Its relative
L1 change since the last step, rescaled by a fitted polynomial, is accumulated; when
the sum reaches the threshold the blocks run (and the sum resets), otherwise the
residual they added last time is added again.

Differences from the reference implementation, on purpose:
- Decisions are per *sampling step*, not per forward call. With real CFG a step makes
  two forward calls (branches); the first decides for both, and each branch keeps its
  own cached residual, so the unconditional pass never reuses the conditional residual.
- State is reset explicitly at the start of every section (`reset`).
- The detail-preserving mode lowers the threshold and always computes the final
  quarter of the steps, where fine detail is formed. (A higher threshold skips more.)
"""

from __future__ import annotations

import torch

# Rescale polynomial, highest power first (fitted for HunyuanVideo by the TeaCache authors).
RESCALE_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)

DETAIL_THRESHOLD_FACTOR = 0.5
DETAIL_FINAL_FRACTION = 0.25


def rescaled_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Polynomial-rescaled relative L1 change, as a 0-dim fp32 tensor on the same device."""
    previous = previous.float()
    rel = (current.float() - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
    out = torch.zeros((), dtype=torch.float32, device=rel.device)
    for c in RESCALE_COEFFICIENTS:
        out = out * rel + c
    return out


class TeaCache:
    reads_signal = True  # should_compute compares the first block's modulated input

    def __init__(self, threshold: float, steps: int, detail: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.steps = steps
        self.threshold = threshold * (DETAIL_THRESHOLD_FACTOR if detail else 1.0)
        # Steps with index >= always_from are always computed (the last one at least).
        final = max(1, round(steps * DETAIL_FINAL_FRACTION)) if detail else 1
        self.always_from = steps - final
        self.computed_steps = 0
        self.skipped_steps = 0
        self.reset()

    def reset(self) -> None:
        """Start of a section: forget the previous signal and residuals."""
        self._accumulated = 0.0
        self._previous: torch.Tensor | None = None
        self._residual: dict[int, torch.Tensor] = {}
        self._step = -1
        self._branch = 0
        self._compute = True

    def begin_step(self, index: int) -> None:
        """Called once per sampling step, before that step's forward calls."""
        self._step = index
        self._branch = -1

    def should_compute(self, modulated: torch.Tensor) -> bool:
        self._branch += 1
        if self._branch > 0:
            # Later branches of the same step follow the first branch's decision.
            if not self._compute and self._branch not in self._residual:
                raise RuntimeError("TeaCache has no cached residual for this branch")
            return self._compute
        if not self.enabled or self._previous is None or self._step == 0 or self._step >= self.always_from:
            compute = True
        else:
            self._accumulated += float(rescaled_change(modulated, self._previous))
            compute = self._accumulated >= self.threshold
        if compute:
            self._accumulated = 0.0
            self.computed_steps += 1
        else:
            self.skipped_steps += 1
        if self.enabled:
            self._previous = modulated.detach().clone()
        self._compute = compute
        return compute

    def apply_cached(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self._residual[self._branch]

    def remember(self, before: torch.Tensor, after: torch.Tensor) -> None:
        if self.enabled:
            self._residual[self._branch] = after - before
