"""The flat view of the config tree: one ``FlagSpec`` per dataclass field.

The CLI, the YAML loader and ``config_to_dict`` all read this one table, so a field added to
sections.py becomes a flag, a YAML key and a saved value without further code.
"""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, fields
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

from sluice.errors import ConfigError
from sluice.config.sections import Config

# Engine fields are spelled like SGLang's server flags so that SGLang command lines carry over.
ENGINE_SECTION = "engine"
ENGINE_PREFIX = "sglang-"

_SCALARS = (int, float, str, bool)
_DESCRIPTIONS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


@dataclass(frozen=True)
class FlagSpec:
    """One config field as the command line and YAML files see it."""

    section: str
    name: str
    flag: str
    kind: type
    item: type | None
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None
    metavar: str | None
    secret: bool = False  # a key: never written to saved configs, checkpoints or trackers

    @property
    def key(self) -> str:
        """The flag with underscores: the argparse dest, the saved YAML key."""
        return normalise_key(self.flag)

    def describe(self) -> str:
        """What a value of this flag must be, for error messages."""
        if self.kind is list:
            return f"a list of {_PLURALS[self.item]}"
        if self.kind is dict:
            return "a mapping (or a JSON object string)"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return _DESCRIPTIONS[self.kind]


def normalise_key(name: str) -> str:
    """Maps ``--rollout-batch-size``, ``rollout-batch-size`` and ``rollout_batch_size`` to one key."""
    return name.lstrip("-").replace("-", "_")


def _resolve_type(hint: Any) -> tuple[type, type | None, bool]:
    """Splits an annotation into (kind, list item type, optional); rejects what the CLI cannot express."""
    optional = False
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {hint!r}")
        hint = args[0]
    origin = get_origin(hint) or hint
    if origin is list and get_args(hint) and get_args(hint)[0] in _SCALARS:
        return list, get_args(hint)[0], optional
    if origin is dict:
        return dict, None, optional
    if origin in _SCALARS:
        return origin, None, optional
    raise TypeError(f"unsupported config field type {hint!r}")


def _default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} needs a default")


def _flag_of(section: str, f: Field) -> str:
    explicit = f.metadata.get("flag")
    if explicit:
        return explicit if explicit.startswith("-") else "--" + explicit
    prefix = ENGINE_PREFIX if section == ENGINE_SECTION else ""
    return "--" + prefix + f.name.replace("_", "-")


def section_types() -> dict[str, type]:
    """Section attribute name -> its dataclass, in declaration order."""
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if not f.metadata.get("internal")}


@cache
def flag_specs() -> tuple[FlagSpec, ...]:
    """Every field of the tree, in declaration order; raises if two fields share a flag."""
    specs: list[FlagSpec] = []
    for section, cls in section_types().items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            kind, item, optional = _resolve_type(hints[f.name])
            specs.append(FlagSpec(
                section=section, name=f.name, flag=_flag_of(section, f), kind=kind, item=item,
                optional=optional, default=_default_of(f), help=f.metadata.get("help", ""),
                choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                secret=bool(f.metadata.get("secret"))))
    keys = [s.key for s in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise TypeError(f"config fields share flags: {duplicates}")
    return tuple(specs)


@cache
def specs_by_key() -> dict[str, FlagSpec]:
    return {s.key: s for s in flag_specs()}


def engine_flags() -> list[str]:
    return [s.flag for s in flag_specs() if s.section == ENGINE_SECTION]


def closest_flag(flag: str) -> str | None:
    """The valid flag nearest to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(flag, [s.flag for s in flag_specs()] + ["--config"], n=1)
    return matches[0] if matches else None


def unknown_flag_reason(flag: str) -> str:
    """Why a flag is not accepted and what to use instead; ``flag`` is spelled with dashes."""
    from sluice.config.slime_compat import rejection  # imports sections, as this module does

    rejected = rejection(flag)
    if rejected:
        return rejected
    engine_start = "--" + ENGINE_PREFIX
    if not flag.startswith(engine_start):
        hint = closest_flag(flag)
        return f"unknown flag {flag}" + (f"; did you mean {hint}?" if hint else "")
    # Compare SGLang option names without the shared prefix, which would make every flag look close.
    option = flag[len(engine_start):]
    options = [f[len(engine_start):] for f in engine_flags()]
    hint = difflib.get_close_matches(option, options, n=1)
    suggestion = f"; did you mean {engine_start}{hint[0]}?" if hint else ""
    return (f"unknown flag {flag}: the engine does not support the SGLang option --{option}{suggestion} "
            f"(supported --sglang-* flags: {', '.join(engine_flags())})")


def parse_json_dict(text: str) -> dict[str, Any]:
    """Reads a dict-valued flag given as JSON text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid JSON {text!r}: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"expected a JSON object, got {text!r}")
    return value


def _coerce_scalar(kind: type, value: Any) -> Any:
    """Checks a YAML scalar against the field type; bools never pass as numbers."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False
    elif kind is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 1e-6 as a string; accept what float() reads, as the CLI does.
        try:
            return float(value)
        except ValueError:
            ok = False
    elif kind is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"expected {_DESCRIPTIONS[kind]}, got {value!r}")
    return float(value) if kind is float else value


def coerce(spec: FlagSpec, value: Any) -> Any:
    """Checks and converts a value read from YAML to the field's type; the error says what was expected."""
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"expected {spec.describe()}, got null")
    if spec.kind is dict:
        if isinstance(value, str):
            return parse_json_dict(value)
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"expected {spec.describe()}, got {value!r}")
    if spec.kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected {spec.describe()}, got {value!r}")
        try:
            return [_coerce_scalar(spec.item, v) for v in value]
        except ConfigError:
            raise ConfigError(f"expected {spec.describe()}, got {value!r}") from None
    out = _coerce_scalar(spec.kind, value)
    if spec.choices and out not in spec.choices:
        raise ConfigError(f"invalid choice {out!r} (choose from {', '.join(spec.choices)})")
    return out


def config_from_values(values: Mapping[str, Any]) -> Config:
    """Builds a Config from defaults plus ``values`` (keys as in ``FlagSpec.key``, already typed)."""
    by_section: dict[str, dict[str, Any]] = {name: {} for name in section_types()}
    for key, value in values.items():
        spec = specs_by_key()[key]
        by_section[spec.section][spec.name] = value
    return Config(**{name: cls(**by_section[name]) for name, cls in section_types().items()})
