"""When each periodic stage runs: which rollout steps the run covers, and after which of them it evaluates,
saves, pushes weights to the engines and refreshes the reference model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    start_rollout: int  # the first step to run (a resumed run's next one)
    num_rollout: int  # steps in the whole run
    trains: bool  # False with --debug-rollout-only
    has_eval_sets: bool  # --eval-prompt-data (or --eval-sft-data) given
    skip_eval_before_train: bool  # --skip-eval-before-train
    eval_interval: int | None  # --eval-interval
    saves: bool  # --save or --save-hf given
    save_interval: int | None  # --save-interval
    update_weights_interval: int  # --update-weights-interval
    ref_update_interval: int | None  # --ref-update-interval
    num_critic_only_steps: int  # --num-critic-only-steps
    engines_only_evaluate: bool = False  # SFT from data: the engines generate the eval sets, no rollouts

    @property
    def steps(self) -> range:
        """The rollout ids this run goes through."""
        return range(self.start_rollout, self.num_rollout)

    def _due(self, interval: int | None, rollout_id: int) -> bool:
        """Every ``interval`` rollout steps, and after the last one."""
        done = rollout_id + 1
        return done == self.num_rollout or bool(interval and done % interval == 0)

    def eval_before_train(self) -> bool:
        """An evaluation at step 0 (not on a resume)."""
        return self.has_eval_sets and not self.skip_eval_before_train and self.start_rollout == 0

    def eval_due(self, rollout_id: int) -> bool:
        return self.has_eval_sets and self._due(self.eval_interval, rollout_id)

    def save_due(self, rollout_id: int) -> bool:
        return self.saves and self.trains and self._due(self.save_interval, rollout_id)

    def sync_due(self, rollout_id: int) -> bool:
        """Weights go to the engines every --update-weights-interval steps, and after the last one (the async
        loop)."""
        return self._due(self.update_weights_interval, rollout_id)

    def push_due(self, rollout_id: int) -> bool:
        """Whether the sync loop pushes the weights to the engines after this step: after every step when they
        generate the next rollout; when they only evaluate (SFT from data), before each evaluation only."""
        return not self.engines_only_evaluate or self.eval_due(rollout_id)

    def ref_update_due(self, rollout_id: int) -> bool:
        interval = self.ref_update_interval
        return bool(interval and (rollout_id + 1) % interval == 0)

    def trains_actor(self, rollout_id: int) -> bool:
        """False for the first --num-critic-only-steps steps, which train the critic only."""
        return rollout_id >= self.num_critic_only_steps
