"""Command line and ``--config`` YAML -> ``Config``, generated from the fields of sections.py.

No flag is written by hand here: each dataclass field becomes one flag (see flags.py), so the help,
the YAML keys and the saved config cannot drift apart from the schema.
"""

from __future__ import annotations

import argparse
from typing import Any

from sluice.config.checks import validate
from sluice.errors import ConfigError
from sluice.config.flags import (
    ENGINE_SECTION,
    FlagSpec,
    config_from_values,
    flag_specs,
    parse_json_dict,
    section_types,
    unknown_flag_reason,
)
from sluice.config.sections import BUILTIN_REWARDS, Config
from sluice.config.compat_rows import Row
from sluice.config.slime_compat import compat_arguments, resolve
from sluice.config.yaml_file import config_to_dict, load_yaml_values, save_config

__all__ = [
    "BUILTIN_REWARDS", "ConfigError", "build_parser", "config_to_dict", "parse_config", "save_config",
    "validate",
]

_SECTION_TITLES = {
    ENGINE_SECTION: "engine (SGLang server flags)",
    "megatron": "megatron (slime's Megatron flags: architecture checked against --hf-checkpoint, parallel sizes "
                "of 1, the rest accepted no-ops; see docs/migrating-from-slime.md)",
}


class _ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises ConfigError instead of printing usage and exiting.

    Callers such as tests and the CLI decide how to report the problem; the CLI prints it and exits 2.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _json_dict_arg(text: str) -> dict[str, Any]:
    """argparse type of dict flags; ArgumentTypeError makes argparse prefix the flag name."""
    try:
        return parse_json_dict(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _help_text(spec: FlagSpec) -> str:
    """The field's help plus its default; '%' is escaped because argparse %-formats help."""
    text = spec.help
    if spec.default not in (None, [], {}):
        text += f" (default: {spec.default})"
    return text.replace("%", "%%")


def _argument_options(spec: FlagSpec) -> dict[str, Any]:
    """add_argument keywords for one field; defaults are SUPPRESS so only given flags appear."""
    options: dict[str, Any] = {"dest": spec.key, "default": argparse.SUPPRESS, "help": _help_text(spec)}
    if spec.metavar:
        options["metavar"] = spec.metavar
    if spec.kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif spec.kind is dict:
        options["type"] = _json_dict_arg
        options.setdefault("metavar", "JSON")
    elif spec.kind is list:
        options.update(type=spec.item, nargs="+")
        options.setdefault("metavar", spec.item.__name__.upper())
    else:
        options["type"] = spec.kind
        if spec.choices:
            options["choices"] = spec.choices
        else:
            options.setdefault("metavar", spec.kind.__name__.upper())
    return options


def build_parser(prog: str = "sluice train") -> argparse.ArgumentParser:
    """The parser of every config flag plus ``--config FILE``; one argument group per section.

    Every default is ``argparse.SUPPRESS``, so the parsed namespace holds exactly the flags given on
    the command line, which is what lets them override a ``--config`` file and nothing else.
    Usage errors raise ConfigError.
    """
    parser = _ConfigArgumentParser(
        prog=prog, description="RL post-training of LLMs: rollout, reward, train, weight sync, eval.",
        allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML file of flag: value pairs (either spelling); command-line flags override it.")
    groups = {name: parser.add_argument_group(_SECTION_TITLES.get(name, name)) for name in section_types()}
    for spec in flag_specs():
        groups[spec.section].add_argument(spec.flag, **_argument_options(spec))
    compat = parser.add_argument_group(
        "slime / Megatron / SGLang flags without a sluice field of their own (no-ops are logged once at start)")
    for flag, row in compat_arguments(set(parser._option_string_actions)):
        compat.add_argument(flag, **_compat_options(flag, row))
    return parser


_COMPAT_DEST = "compat:"


def _compat_options(flag: str, row: Row) -> dict[str, Any]:
    """add_argument keywords of a table row: its words are kept as a list (a switch: an empty one)."""
    options: dict[str, Any] = {"dest": _COMPAT_DEST + flag, "default": argparse.SUPPRESS,
                               "help": f"{row.treatment.value}: {row.note}".replace("%", "%%")}
    if row.takes == "switch":
        return {**options, "action": "store_const", "const": []}
    return {**options, "nargs": 1 if row.takes == "value" else "+", "metavar": "VALUE"}


def _leftover_message(extras: list[str]) -> str:
    """Explains the first argument argparse did not recognise."""
    first = extras[0]
    if first.startswith("-"):
        return unknown_flag_reason(first.split("=", 1)[0])
    return f"unexpected argument {first!r} (every value follows its flag)"


def parse_config(argv: list[str] | None = None) -> Config:
    """Parses ``argv`` (default: sys.argv[1:]), loading ``--config FILE`` first; flags override the file.

    Returns a normalised but not validated Config: call ``validate`` for the run's purpose.
    Raises ConfigError (never SystemExit, except for --help) on any unknown or mistyped flag or key.
    """
    given, extras = build_parser().parse_known_args(argv)
    if extras:
        raise ConfigError(_leftover_message(extras))
    cli_values = vars(given)
    compat_flags = {key[len(_COMPAT_DEST):]: cli_values.pop(key) for key in list(cli_values)
                    if key.startswith(_COMPAT_DEST)}
    config_path = cli_values.pop("config", None)
    values = load_yaml_values(config_path) if config_path else {}
    values.update(cli_values)
    config = config_from_values(values)
    config.compat_flags = compat_flags
    resolve(config, set(cli_values))
    return config
