"""The run's evaluation on the --eval-prompt-data sets: --eval-function-path, or the built-in one (mean reward,
accuracy as the fraction of samples with reward >= --eval-accuracy-threshold, and the response tokens generated;
a few example samples of each set go to the sample log)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sluice.config import EvalConfig, RolloutConfig
from sluice.rollout.evaluation import EvalFn, EvalRequest, reward_metrics
from sluice.rollout.finish import MemoryGuard, SampleSink, scalar_rewards
from sluice.rollout.manager import RolloutManager
from sluice.rollout.sampling import sampling_params
from sluice.rollout.step import PromptBatches
from sluice.types import Sample


@dataclass
class Evaluator:
    manager: RolloutManager
    eval_sets: dict[str, list[Sample]]  # --eval-prompt-data, by name
    rollout: RolloutConfig  # the sampling settings eval ones fall back to
    eval: EvalConfig
    memory: MemoryGuard
    loop: asyncio.AbstractEventLoop  # the run's one event loop
    source: PromptBatches | None = None  # the training prompt source (slime's eval functions receive it)
    evaluate_fn: EvalFn | None = None  # --eval-function-path
    samples: SampleSink | None = None  # example samples of each eval set (not of --eval-function-path's)

    def evaluate(self, step: int) -> dict[str, float]:
        """The metrics of an evaluation after ``step`` rollout steps (0: before training)."""
        return self.loop.run_until_complete(self.evaluate_async(step))

    async def evaluate_async(self, step: int) -> dict[str, float]:
        """``evaluate`` on the running event loop (the async loop's: its engine clients stay on one loop)."""
        if not self.eval_sets:  # an SFT run evaluating held-out SFT rows only (--eval-sft-data)
            return {}
        if self.evaluate_fn is not None:
            request = EvalRequest(step, self.eval_sets, self.eval.n_samples_per_eval_prompt,
                                  sampling_params(self.rollout, self.eval), self.manager.seeded_as("eval"),
                                  self.source, self.eval.eval_accuracy_threshold)
            return await self.evaluate_fn(request)
        out: dict[str, float] = {}
        num_tokens = 0
        for name, samples in self.eval_sets.items():
            with self.memory.explain("eval"):
                groups = await self.manager.seeded_as(f"eval/{name}").generate_groups(
                    samples, self.eval.n_samples_per_eval_prompt, sampling_params(self.rollout, self.eval),
                    shape_rewards=False)
            self.memory.check_engines(groups)
            group_rewards = scalar_rewards(groups, self.manager)
            rewards = [r for per_group in group_rewards for r in per_group]
            out.update(reward_metrics(name, rewards, self.eval.eval_accuracy_threshold))
            if self.samples is not None:
                self.samples.record(step, f"eval/{name}", groups, group_rewards)
            num_tokens += sum(s.response_length for g in groups for s in g.samples)
            self.manager.failures.flush(f"in eval {name}")
        out["eval/response_tokens"] = float(num_tokens)
        return out
