"""``sluice serve``: the engine behind HTTP. SGLang's native API (``native_api``, ``native_schema``), the
OpenAI-compatible API (``openai_api``, ``openai_schema``), control and weight-update routes (``control_api``,
``weight_api``, ``weight_staging``), the asyncio face of the engine (``async_engine``, ``stream_text``) and the
app and its per-process state (``app``, ``context``)."""
