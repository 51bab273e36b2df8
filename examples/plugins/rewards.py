"""Reward plug-ins: --custom-rm-path examples/plugins/rewards.py:<name> (add --group-rm for the group forms)."""

from __future__ import annotations

from sluice.types import Sample


def exact_with_length_penalty(sample: Sample) -> float:
    """sluice's form: 1 for the right answer, minus 0.01 per response token beyond 8."""
    correct = sample.response.strip() == str(sample.label).strip()
    return float(correct) - 0.01 * max(sample.response_length - 8, 0)


async def scored_dict(sample: Sample) -> dict[str, float]:
    """An async reward returning several numbers; --reward-key acc trains on one of them."""
    return {"acc": float(sample.response.strip() == str(sample.label).strip()), "length": float(sample.response_length)}


def slime_style(args, sample) -> float:
    """slime's form: `args` holds the run's flags under slime's names; a response cut at the budget loses 0.5."""
    correct = sample.response.strip() == str(sample.label).strip()
    return float(correct) - 0.5 * (sample.response_length >= args.rollout_max_response_len)


def rank_in_group(samples: list[Sample]) -> list[float]:
    """--group-rm: correct answers score 1, and the shortest correct one of the group 1.5."""
    correct = [s.response.strip() == str(s.label).strip() for s in samples]
    lengths = [s.response_length for s, ok in zip(samples, correct) if ok]
    best = min(lengths, default=None)
    return [(1.5 if s.response_length == best else 1.0) if ok else 0.0 for s, ok in zip(samples, correct)]
