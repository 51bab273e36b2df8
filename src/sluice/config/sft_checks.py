"""Checks of SFT from data (``--rollout-function-path sft``): the responses come from the rows, so the training
steps generate and score nothing. Eval sets (--eval-prompt-data) are generated and scored as in an RL run: the
run then starts an engine for them alone, so the flags that configure generation and scoring act on the eval."""

from __future__ import annotations

from collections.abc import Iterator

from sluice.config.sections import Config

SFT_FLAG = "--rollout-function-path sft"


def sft_problems(config: Config) -> Iterator[str]:
    rollout, data, algo = config.rollout, config.data, config.algorithm
    if not rollout.sft_from_data:
        if data.response_key is not None:
            yield (f"--response-key is read only by the SFT rollout function ({SFT_FLAG}); an RL run samples its "
                   "responses from the engine: drop --response-key or add the SFT flags")
        if config.eval.eval_sft_data:
            yield (f"--eval-sft-data holds SFT rows (responses read with --response-key): it needs {SFT_FLAG}; "
                   "an RL run evaluates with --eval-prompt-data")
        return
    if config.eval.eval_sft_data and config.debug.debug_rollout_only:
        yield "--eval-sft-data is scored by the trainer, which --debug-rollout-only does not build"
    if algo.loss_type != "sft_loss":
        yield f"{SFT_FLAG} trains on the responses in the data: set --loss-type sft_loss (got {algo.loss_type})"
    if rollout.n_samples_per_prompt != 1:
        yield (f"--n-samples-per-prompt {rollout.n_samples_per_prompt} with {SFT_FLAG} would train each row "
               f"{rollout.n_samples_per_prompt} times per step: drop it (each row has one response)")
    yield from _eval_problems(config)


def _eval_problems(config: Config) -> Iterator[str]:
    """Generation and scoring flags act only on the eval sets; the built-in eval needs a reward to score with."""
    reward, rollout = config.reward, config.rollout
    has_reward = bool(reward.rm_type or reward.custom_rm_path)
    if not config.eval.eval_prompt_data:
        if config.eval.eval_function_path:
            yield (f"--eval-function-path evaluates the --eval-prompt-data sets, and this SFT run ({SFT_FLAG}) has "
                   "none: add --eval-prompt-data NAME PATH, or drop --eval-function-path")
        for flag, value in (("--rm-type", reward.rm_type), ("--custom-rm-path", reward.custom_rm_path),
                            ("--custom-generate-function-path", rollout.custom_generate_function_path),
                            ("--agent-function-path", rollout.agent_function_path)):
            if value:
                yield (f"{flag} has no effect with {SFT_FLAG} without eval sets: the training steps generate and "
                       "score nothing (with --eval-prompt-data it would act on the eval)")
        return
    if not has_reward and not config.eval.eval_function_path and rollout.agent_function_path is None:
        yield (f"--eval-prompt-data in an SFT run ({SFT_FLAG}) scores the eval responses with a reward: set "
               "--rm-type (with --label-key) or --custom-rm-path, or give --eval-function-path")
