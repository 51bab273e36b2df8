"""Checks of SFT from data (``--rollout-function-path sft``): the responses come from the rows, and no engine
starts, so flags that configure generation, scoring or evaluation would have nothing to act on."""

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
        return
    if algo.loss_type != "sft_loss":
        yield f"{SFT_FLAG} trains on the responses in the data: set --loss-type sft_loss (got {algo.loss_type})"
    if rollout.n_samples_per_prompt != 1:
        yield (f"--n-samples-per-prompt {rollout.n_samples_per_prompt} with {SFT_FLAG} would train each row "
               f"{rollout.n_samples_per_prompt} times per step: drop it (each row has one response)")
    for flag, value in (("--eval-prompt-data", config.eval.eval_prompt_data),
                        ("--eval-function-path", config.eval.eval_function_path)):
        if value:
            yield (f"{flag}: an SFT run ({SFT_FLAG}) starts no engine to generate with; evaluate the exported "
                   "model (--save-hf) in a separate run")
    for flag, value in (("--rm-type", config.reward.rm_type), ("--custom-rm-path", config.reward.custom_rm_path),
                        ("--custom-generate-function-path", rollout.custom_generate_function_path),
                        ("--agent-function-path", rollout.agent_function_path)):
        if value:
            yield f"{flag} has no effect with {SFT_FLAG}: nothing is generated or scored"
