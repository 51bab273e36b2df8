"""The inference engine, by job:

- the core (this folder): ``local_engine`` (worker thread and control calls), ``scheduler``, ``block_manager``
  and ``kv_pool`` (paged KV cache with prefix sharing), ``sequence``, ``model_runner`` (inputs, CUDA graphs,
  overlap), ``model_ops`` (the ops the model runs with), ``sampler`` and ``sampling_kernel``, ``stopping``,
  ``stats``, ``settings`` (the engine's config section);
- ``attention/``: paged attention backends (PyTorch reference, Triton) and the rotary + K/V-write kernel;
- ``server/``: the HTTP server (SGLang native and OpenAI APIs);
- ``clients/``: the engine contract and its clients (in-process, HTTP, router).

The model definitions live in ``sluice.models`` and the weight wire format in ``sluice.weights``; the engine
imports nothing from the config, data, rollout, trainer or buffer packages.
"""
