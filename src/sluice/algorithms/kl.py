"""Per-token estimators of KL(policy || reference) from log-probs of tokens sampled from the policy.

With ``d = logp - ref_logp`` at a sampled token (Schulman, "Approximating KL divergence"):

* ``k1 = d``: unbiased, high variance, can be negative per token.
* ``k2 = d**2 / 2``: biased, low variance, >= 0.
* ``k3 = exp(-d) + d - 1``: unbiased, low variance, >= 0.
* ``low_var_kl``: k3 clamped to ``[-10, 10]``, so one wildly off token cannot dominate the loss (slime, verl and
  OpenRLHF clamp it there; slime's k3 is not clamped, and neither is sluice's).

On gradients, when used as a *loss* on on-policy samples (a reward penalty is a different use): the
expected gradient of k1 is 0 (useless as a loss), of k2 it is the gradient of KL(policy || ref), and
of k3 it is the gradient of the *forward* KL(ref || policy). Pick accordingly.

Hazards: ``d`` is clamped to +-20 before ``exp`` in k3 and low_var_kl (``exp(-d)`` overflows float32 for
d < -88, giving inf and then NaN; at -d = 20 k3 is about 4.9e8, finite); low_var_kl's clamp to ``[-10, 10]``
also applies. Both clamps zero the gradient of the affected tokens. k3 is evaluated as
``expm1(-d) + d`` to avoid cancellation near d = 0. Inputs are upcast to float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.registry import get, register

KIND = "kl"
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def _log_ratio(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    return log_probs.to(dtype) - ref_log_probs.to(dtype).detach()


@register(KIND, "k1")
def k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``logp - ref_logp``."""
    return _log_ratio(log_probs, ref_log_probs)


@register(KIND, "k2")
def k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``0.5 * (logp - ref_logp)**2``."""
    return 0.5 * _log_ratio(log_probs, ref_log_probs).square()


@register(KIND, "k3")
def k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1``, log-ratio clamped to +-20 (against overflow only)."""
    x = torch.clamp(-_log_ratio(log_probs, ref_log_probs), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ref - logp
    # expm1(x) - x, not exp(x) - x - 1: for small x the latter cancels catastrophically and can come out
    # slightly negative (e.g. x = 1e-6 in float32); expm1 keeps the x**2/2 term and the result >= 0.
    return torch.expm1(x) - x


@register(KIND, "low_var_kl")
def low_var_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3 clamped to [-10, 10] (``K3_CLAMP``), as slime, verl and OpenRLHF compute ``low_var_kl``."""
    return torch.clamp(k3(log_probs, ref_log_probs), -K3_CLAMP, K3_CLAMP)


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate of the given ``kind`` (k1, k2, k3, low_var_kl); same shape as the inputs."""
    return get(KIND, kind)(log_probs, ref_log_probs)
