"""Placing the parts of a run: a local in-process mode for one machine (Ray pools come later)."""
