"""Records that cross a boundary between parts of sluice.

Token ids are plain ``list[int]`` on the rollout side (they travel over HTTP and between processes) and
become tensors only inside ``TrainBatch``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class Status(str, enum.Enum):
    """Where a sample is in its life; the string values are what jsonl dumps show."""

    PENDING = "pending"  # not generated yet, or requeued after an abort
    COMPLETED = "completed"  # the engine stopped on EOS or a stop string/token
    TRUNCATED = "truncated"  # hit max new tokens (or the context limit)
    ABORTED = "aborted"  # stopped from outside (weight update, shutdown); may be resumed
    FAILED = "failed"  # the generate or reward function raised; excluded from training


@dataclass
class SamplingParams:
    """Per-request sampling settings; field names follow SGLang's ``sampling_params``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)  # stop strings; matched on decoded text, trimmed from output
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None  # per-request seed: same seed + same weights -> same tokens


@dataclass
class Sample:
    """One trajectory: a prompt and one response, with everything training needs."""

    prompt: str | list[dict[str, Any]]  # the raw prompt: text, or chat messages before templating
    group_index: int = 0  # index of the prompt group within its rollout
    index: int = 0  # globally unique sample index within the run
    prompt_tokens: list[int] = field(default_factory=list)  # token ids of the (templated) prompt
    tokens: list[int] = field(default_factory=list)  # prompt + response token ids
    response: str = ""  # decoded response text
    response_length: int = 0  # number of response tokens, = len(tokens) - len(prompt_tokens)
    label: Any = None  # the reference answer, from --label-key
    reward: float | dict[str, float] | None = None
    loss_mask: list[int] = field(default_factory=list)  # per response token; 0 for tool output
    rollout_log_probs: list[float] = field(default_factory=list)  # per response token, from the engine
    weight_versions: list[int] = field(default_factory=list)  # policy version of each generation call
    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)  # from --metadata-key, plus plug-in extras

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[len(self.prompt_tokens) :]

    @property
    def policy_version(self) -> int | None:
        """The oldest weight version that produced any of this sample's tokens; None before generation."""
        return min(self.weight_versions) if self.weight_versions else None

    def scalar_reward(self, key: str | None = None) -> float:
        """The reward as one float; ``key`` picks from a dict reward (--reward-key)."""
        if self.reward is None:
            raise ValueError(f"sample {self.index} has no reward yet")
        if isinstance(self.reward, dict):
            if key is None:
                raise ValueError(
                    f"sample {self.index} has a dict reward {sorted(self.reward)}; set --reward-key to pick one"
                )
            return float(self.reward[key])
        return float(self.reward)


@dataclass
class SampleGroup:
    """The ``n_samples_per_prompt`` samples of one prompt; GRPO normalises rewards within it."""

    samples: list[Sample]
    group_id: int = -1  # set by the Data Buffer when it hands the group out; -1: not from a buffer

    @property
    def prompt(self):
        return self.samples[0].prompt

    @property
    def policy_version(self) -> int | None:
        """The oldest weight version behind any sample of the group (what staleness is measured by)."""
        versions = [s.policy_version for s in self.samples if s.policy_version is not None]
        return min(versions) if versions else None


@dataclass
class TrainBatch:
    """Samples flattened and right-padded for the trainer; B samples, T = longest prompt+response.

    Positions are token positions in ``input_ids``; a response token at position t is predicted by the
    logits at t-1, so per-token tensors below are aligned with ``input_ids[:, 1:]`` (length T-1).
    """

    input_ids: torch.Tensor  # [B, T] int64, pad id after each sequence
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    loss_mask: torch.Tensor  # [B, T-1] float, 1 where the target token is a trained response token
    advantages: torch.Tensor  # [B, T-1] float, per target token (broadcast per sequence for GRPO)
    rollout_log_probs: torch.Tensor  # [B, T-1] float, engine logprobs of the target tokens (0 off-mask)
    old_log_probs: torch.Tensor | None = None  # [B, T-1] trainer logprobs before the update, if computed
    ref_log_probs: torch.Tensor | None = None  # [B, T-1] reference-model logprobs, when a KL term is on
    rewards: torch.Tensor | None = None  # [B] scalar reward per sample (for metrics)

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> "TrainBatch":
        """A sub-batch (a micro-batch) with the same fields; padding columns past the longest row are cut."""
        picked = {name: (value[rows] if isinstance(value, torch.Tensor) else value) for name, value in vars(self).items()}
        width = int(picked["attention_mask"].sum(dim=1).max().item()) if picked["attention_mask"].numel() else 1
        width = max(width, 2)
        for name, value in picked.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                cut = width if name in ("input_ids", "attention_mask") else width - 1
                picked[name] = value[:, :cut]
        return TrainBatch(**picked)
