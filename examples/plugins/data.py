"""--data-source-path: prompts made on the fly instead of read from --prompt-data."""

from __future__ import annotations

import random

from sluice.types import Sample


class AdditionStream:
    """Endless two-digit additions, seeded: next_batch never runs out; state_dict makes resume exact."""

    def __init__(self, prompts: list[Sample], seed: int):
        self.seed, self.num_drawn = seed, 0

    def next_batch(self, n: int) -> list[Sample]:
        batch = []
        for _ in range(n):
            rng = random.Random(f"{self.seed}-{self.num_drawn}")
            a, b = rng.randrange(100), rng.randrange(100)
            batch.append(Sample(prompt=f"{a:02d}+{b:02d}=", label=str(a + b), metadata={"task": "add"}))
            self.num_drawn += 1
        return batch  # no prompt_tokens: sluice tokenizes them (chat template per --apply-chat-template)

    def state_dict(self) -> dict:
        return {"num_drawn": self.num_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.num_drawn = state["num_drawn"]
