"""--eval-function-path of the example: greedy accuracy and tool-use rate per eval set."""

from __future__ import annotations

from sluice.rollout import EvalRequest


async def tool_use_and_accuracy(request: EvalRequest) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, prompts in request.eval_sets.items():
        groups = await request.manager.generate_groups(prompts, request.n_samples, request.sampling_params,
                                                       shape_rewards=False)
        samples = [s for g in groups for s in g.samples]
        metrics[f"eval/{name}/accuracy"] = sum(s.reward == 1.0 for s in samples) / len(samples)
        metrics[f"eval/{name}/tool_use_rate"] = sum(
            s.metadata.get("metrics", {}).get("used_tool", 0.0) for s in samples) / len(samples)
        called = [s for s in samples if s.metadata.get("metrics", {}).get("used_tool")]
        direct = [s for s in samples if not s.metadata.get("metrics", {}).get("used_tool")]
        for label, part in (("with_tool", called), ("without_tool", direct)):
            if part:
                metrics[f"eval/{name}/accuracy_{label}"] = sum(s.reward == 1.0 for s in part) / len(part)
    return metrics
