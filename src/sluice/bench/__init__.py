"""Benchmarks that print one JSON line each (never timed tests): `sluice bench rollout|sync|loops`, and the GPU
kernels alone with `python -m sluice.bench.attention` and `python -m sluice.bench.sampling`."""
