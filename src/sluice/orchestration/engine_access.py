"""Who may call a run's engine servers: a key per run, and the directories they may load weights from.

A Ray run's engines listen on their node's address (127.0.0.1 only when every actor is on this machine), so the
run protects them before they start: ``protect_engine_servers`` gives the engine section a random key (unless
--sglang-api-key gives one) and the run's own weight directories. The key travels inside the config to the
engine actors (their servers check it) and to the trainer (its weight sync sends it); the engine pool asks an
actor for it to build the rollout's clients. Nothing else learns it: the saved config, checkpoints and trackers
record keys as null (config/yaml_file.py).
"""

from __future__ import annotations

import dataclasses
import secrets

from sluice.config import Config, EngineConfig
from sluice.net.auth import ApiKeys
from sluice.sync.factory import weight_sync_dir

KEY_BYTES = 32  # 256 random bits, URL-safe base64: 43 characters


def protect_engine_servers(config: Config) -> Config:
    """``config`` with the engine servers' key and weight roots set; a run without engine servers is unchanged."""
    if not config.cluster.distributed:
        return config
    engine = config.engine
    roots = [*engine.weight_load_dirs, str(weight_sync_dir(config.sync, config.logging.run_dir)),
             *(d for d in (config.checkpoint.save, config.checkpoint.save_hf) if d)]
    protected = dataclasses.replace(engine, api_key=engine.api_key or secrets.token_urlsafe(KEY_BYTES),
                                    weight_load_dirs=list(dict.fromkeys(roots)))
    return dataclasses.replace(config, engine=protected)


def engine_client_key(engine: EngineConfig) -> str | None:
    """The key the run's own clients send: the admin key when there is one (it opens every route), else the API key."""
    return ApiKeys(engine.api_key, engine.admin_api_key).client_key
