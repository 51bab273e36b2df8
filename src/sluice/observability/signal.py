"""Warnings for a run that trains without a learning signal, read from each step's logged metrics.

A GRPO run whose groups all score the same reward has every advantage 0, a loss of 0 and a gradient of 0: it
runs to the end and changes nothing, and the metrics only show it to someone who knows where to look. The
watch below says so in the run's log, the first time and then every ``REPEAT_EVERY`` steps while it lasts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

ZERO_STD_GROUP_FRACTION = "rollout/zero_std_group_fraction"  # rollout/metrics.py
ADVANTAGE_ABS_MEAN = "train/advantage_abs_mean"  # trainer/update.py
GRAD_NORM = "train/grad_norm"
REWARD_MEAN = "rollout/reward_mean"
# A condition that lasts is warned about on its 1st step, then on its (1 + 10k)th: often enough to be seen in
# a long log, rarely enough not to bury it.
REPEAT_EVERY = 10


class RepeatingWarning:
    """Counts the consecutive steps a condition holds; says when a warning is due (the first, then every
    ``every`` steps). A step without the condition starts the count again."""

    def __init__(self, every: int = REPEAT_EVERY) -> None:
        self.every, self.num_steps = every, 0

    def due(self, holds: bool) -> bool:
        self.num_steps = self.num_steps + 1 if holds else 0
        return holds and (self.num_steps - 1) % self.every == 0


class SignalWatch:
    """Looks at each training step's metrics and logs a warning when the step taught the policy nothing.

    * no learning signal: every group's rewards are equal and so every advantage is 0. Both must hold: with
      --kl-coef (KL-shaped rewards) or a critic (ppo) equal rewards can still give nonzero advantages, and
      steps that train nothing (--debug-rollout-only, sft_loss) report no advantages and are not judged.
    * a zero gradient norm although some advantage is nonzero: the loss reached no trainable weight.
    """

    def __init__(self, log: Callable[[str], None], every: int = REPEAT_EVERY) -> None:
        self.log = log  # the run's log (build_run's ``log``): each warning as one line starting "warning: "
        self.no_signal = RepeatingWarning(every)
        self.zero_grad = RepeatingWarning(every)

    def check(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """The warnings due at ``step`` (also logged, prefixed "warning: ")."""
        messages = []
        advantage = metrics.get(ADVANTAGE_ABS_MEAN)
        equal_rewards = metrics.get(ZERO_STD_GROUP_FRACTION) == 1.0 and advantage == 0.0
        if self.no_signal.due(equal_rewards):
            messages.append(_no_signal_message(step, metrics, self.no_signal.num_steps))
        grad_norm = metrics.get(GRAD_NORM)
        if self.zero_grad.due(grad_norm == 0.0 and advantage is not None and advantage > 0.0):
            messages.append(_zero_grad_message(step, advantage, self.zero_grad.num_steps))
        for message in messages:
            self.log("warning: " + message)
        return messages


def _no_signal_message(step: int, metrics: Mapping[str, float], num_steps: int) -> str:
    reward = metrics.get(REWARD_MEAN)
    reward_text = f" (reward mean {reward:.4g})" if reward is not None else ""
    return (f"no learning signal at step {step}: every group's rewards are equal{reward_text}, so every "
            f"advantage is 0 and the policy does not change ({num_steps} step(s) in a row; repeated every "
            f"{REPEAT_EVERY} steps while it lasts). Consider: checking the reward function and the labels it "
            "compares with (--rm-type / --custom-rm-path, --label-key, --reward-key); more samples per prompt "
            "(--n-samples-per-prompt); a higher --rollout-temperature; prompts neither always solved nor never "
            "solved; or a --dynamic-sampling-filter-path that drops groups with equal rewards.")


def _zero_grad_message(step: int, advantage: float, num_steps: int) -> str:
    return (f"gradient norm 0 at step {step} although the advantages are not (mean |advantage| "
            f"{advantage:.4g}; {num_steps} step(s) in a row; repeated every {REPEAT_EVERY} steps while it "
            "lasts): the loss reaches no trainable weight. Check that the loss mask selects response tokens "
            "and that a custom loss keeps the logprobs' gradient (no .detach(), no torch.no_grad()).")
