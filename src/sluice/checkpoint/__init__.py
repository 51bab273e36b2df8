"""Atomic save and resume of a run: trainer state, data cursor, rollout step."""
