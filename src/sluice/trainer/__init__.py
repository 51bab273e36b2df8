"""The trainer: actor (and reference) models, per-token logprobs, the loss step and the optimizer."""
