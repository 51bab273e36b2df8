"""The trainer: actor, reference and (for PPO) critic models, per-token logprobs, the loss step, the optimizer."""
