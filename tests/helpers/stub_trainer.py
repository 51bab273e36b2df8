"""A trainer stand-in for update_policy's wiring, and sample groups of given rewards."""

from __future__ import annotations

from sluice.trainer.loss import ROLLOUT_LOGPROB_ABS_DIFF
from sluice.types import Sample, SampleGroup, Status


class RecordingTrainer:
    """Trainer stand-in: logprobs 0.1 above the rollout's, records what each train_step received."""

    needs_ref = False

    def __init__(self, step_diffs=(0.5, 0.9)):
        self.step_diffs, self.steps, self.num_logprob_passes = list(step_diffs), [], 0

    def compute_logprobs(self, batch, reference=False):
        self.num_logprob_passes += 1
        return batch.rollout_log_probs + 0.1 * batch.loss_mask

    def train_step(self, batch, max_len=None):
        self.steps.append((batch, max_len))
        return {"train/loss": 1.0, ROLLOUT_LOGPROB_ABS_DIFF: self.step_diffs[len(self.steps) - 1]}


def groups_of(rewards: list[list[float]], with_logprobs: bool = True) -> list[SampleGroup]:
    groups = []
    for g, group_rewards in enumerate(rewards):
        samples = [Sample(prompt="p", group_index=g, index=g * 10 + i, prompt_tokens=[5, 6],
                          tokens=[5, 6] + [7] * (i + 1), response_length=i + 1, status=Status.COMPLETED,
                          rollout_log_probs=[-0.5] * (i + 1) if with_logprobs else [])
                   for i in range(len(group_rewards))]
        groups.append(SampleGroup(samples))
    return groups


REWARDS = [[1.0, 0.0], [0.0, 0.0]]
