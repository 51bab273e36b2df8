"""YAML config files: flat ``flag: value`` mappings read by ``--config`` and written by ``save_config``.

Keys are flag names in either spelling (``rollout-batch-size`` or ``rollout_batch_size``); values are
checked against the field types just as command-line values are, so a typo fails before a run starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sluice.errors import ConfigError
from sluice.config.flags import (
    ENGINE_PREFIX,
    closest_flag,
    coerce,
    flag_specs,
    normalise_key,
    specs_by_key,
    unknown_flag_reason,
)
from sluice.config.sections import Config


def _read_mapping(path: Path) -> dict[Any, Any]:
    """The top-level mapping of a YAML file; an empty file is an empty mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8: byte 0x{err.object[err.start]:02x} at byte {err.start} "
                          f"({err.reason}); re-encode the file as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _unknown_key_message(path: Path, key: str) -> str:
    """Names the file and key, and suggests a close key in the spelling the file used."""
    flag = "--" + key.lstrip("-").replace("_", "-")
    if flag.startswith("--" + ENGINE_PREFIX):
        return f"{path}: unknown key {key!r}: {unknown_flag_reason(flag)}"
    hint = closest_flag(flag)
    if hint is None:
        return f"{path}: unknown key {key!r}"
    spelled = hint[2:].replace("-", "_") if "_" in key else hint[2:]
    return f"{path}: unknown key {key!r}; did you mean {spelled!r}?"


def load_yaml_values(path: str | Path) -> dict[str, Any]:
    """Reads a config file into typed values keyed like ``FlagSpec.key``; errors name file and key."""
    path = Path(path)
    out: dict[str, Any] = {}
    for key, value in _read_mapping(path).items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not a flag name")
        spec = specs_by_key().get(normalise_key(key))
        if spec is None:
            raise ConfigError(_unknown_key_message(path, key))
        if spec.key in out:
            raise ConfigError(f"{path}: key {key!r} is given twice (as - and _ spellings)")
        try:
            out[spec.key] = coerce(spec, value)
        except ConfigError as err:
            raise ConfigError(f"{path}: key {key!r} ({spec.flag}): {err}") from None
    return out


def config_to_dict(config: Config) -> dict[str, Any]:
    """Every field as a flat ``{flag_with_underscores: value}`` dict (engine keys keep ``sglang_``). Secrets (API
    keys) read None: this dict is what saved configs, checkpoints and trackers record."""
    return {s.key: None if s.secret else copy.deepcopy(getattr(getattr(config, s.section), s.name))
            for s in flag_specs()}


def save_config(config: Config, path: str | Path) -> None:
    """Writes the full config as YAML that ``--config`` loads back unchanged (runs record what they ran)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False))
