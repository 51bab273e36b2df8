"""Rollout: runs the generate function over engines, scores samples, and evaluates."""
