"""Pure-torch RL algorithm pieces: tensors and a few scalars in, tensors (and a metrics dict) out.

Importing this package registers every variant; look them up with ``registry.get(kind, name)``.
Kinds: "advantage", "token_advantage", "policy_loss", "kl", "aggregation", "importance". Every formula, epsilon
and clamp is written down in docs/algorithms.md (and docs/numerics.md).
"""

from sluice.algorithms.advantages import (
    broadcast_to_tokens,
    dr_grpo,
    grpo,
    reinforce_plus_plus_baseline_sample,
    rloo,
)
from sluice.algorithms.aggregation import aggregate
from sluice.algorithms.entropy import entropy_from_logits
from sluice.algorithms.importance import effective_sample_size, importance_weight
from sluice.algorithms.kl import kl_estimate
from sluice.algorithms.logprobs import log_probs_from_logits
from sluice.algorithms.masked import masked_mean, masked_std, masked_sum, whiten
from sluice.algorithms.policy_loss import cispo, gspo, ppo_clip
from sluice.algorithms.registry import get, names, register
from sluice.algorithms.returns import (
    discounted_returns,
    gae,
    kl_penalized_rewards,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    token_level_rewards,
)
from sluice.algorithms.sft_loss import sft_nll
from sluice.algorithms.value_loss import clipped_value_loss, explained_variance

__all__ = [
    "aggregate", "broadcast_to_tokens", "cispo", "clipped_value_loss", "discounted_returns", "dr_grpo",
    "effective_sample_size", "entropy_from_logits", "explained_variance", "gae", "get", "grpo", "gspo",
    "importance_weight", "kl_estimate", "kl_penalized_rewards", "log_probs_from_logits", "masked_mean", "masked_std",
    "masked_sum", "names", "ppo_clip", "register", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
    "reinforce_plus_plus_baseline_sample", "rloo", "sft_nll", "token_level_rewards", "whiten",
]
