"""The built-in SFT rollout function (``--rollout-function-path sft``): a step's batch is the next rows of the
data, whose responses and loss masks were built when the data loaded (data/sft.py). Nothing is generated or
scored for training, so the run starts no engine unless --eval-prompt-data gives eval sets (the engine then only
evaluates them); with ``--loss-type sft_loss`` the trainer minimises the responses' NLL.

slime's ``slime.rollout.sft_rollout.generate_rollout`` is accepted as another name for it (config/sections.py).
"""

from __future__ import annotations

from sluice.rollout.step import RolloutOutput, RolloutRequest
from sluice.types import SampleGroup, Status


async def sft_rollout(request: RolloutRequest) -> RolloutOutput:
    """``num_groups`` rows, one sample each, trained as they are (reward 0: the SFT loss reads none)."""
    groups = []
    for offset, sample in enumerate(request.source.next_batch(request.num_groups)):
        if sample.response_length == 0 or sample.status != Status.COMPLETED:
            raise ValueError(f"--rollout-function-path sft got a prompt without a response (sample {sample.index}): "
                             "the data must be loaded with --response-key")
        sample.index, sample.reward = request.first_index + offset, 0.0
        groups.append(SampleGroup([sample]))
    return RolloutOutput(groups)
