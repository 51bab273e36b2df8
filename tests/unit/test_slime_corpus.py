"""Every flag of slime's parser and of every run script in slime's scripts/ folder goes through sluice's parser.

tests/data/slime/flags.json holds our extraction (tests/data/slime/extract.py) of slime at the commit it records:
the parser's flags, and each script's argument lines (the flag and its words, MODEL_ARGS from the model file it
sources). Here each script's list runs through the parser, the config checks and the architecture check with its
paths swapped for a tiny local checkpoint and parquet file. A flag must be one of sluice's, or a row of the
tables that refuses it with a reason; no flag may be unknown, and every check that fails must name its flag.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.architectures import build_arch_checkpoint
from sluice.config import ConfigError, build_parser, parse_config, validate
from sluice.config.megatron_checks import check_against_checkpoint
from sluice.config.slime_compat import FLAGS, REJECTED_PREFIXES, Treatment, rejection

CORPUS = json.loads((Path(__file__).resolve().parents[1] / "data" / "slime" / "flags.json").read_text())
SCRIPTS = {script["path"]: script for script in CORPUS["scripts"]}
OWN_FLAGS = set(build_parser()._option_string_actions)
# Shell values the extraction cannot resolve (computed from variables of a model file's loop); the flag is checked
# against the checkpoint, so any integer stands in.
UNRESOLVED = {"--num-layers": "2"}


@pytest.fixture(scope="module")
def local_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("slime_corpus")
    build_arch_checkpoint(root / "model", "qwen3")
    rows = [{"messages": [{"role": "user", "content": f"{i} + {i}?"}], "label": str(2 * i)} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), root / "data.parquet")
    return {"model": str(root / "model"), "data": str(root / "data.parquet"), "save": str(root / "save")}


def shell_value(flag: str, word: str) -> list[str]:
    """A word as bash would give it: $((integer arithmetic)) evaluated, $(seq A B C) expanded."""
    if "$" not in word:
        return [word]
    arithmetic = re.fullmatch(r"\$\(\(([\d\s*+]+)\)\)", word)
    if arithmetic:
        return [str(eval(arithmetic.group(1), {"__builtins__": {}}))]  # digits, spaces, * and + only
    seq = re.fullmatch(r"\$\(seq (\d+) (\d+) (\d+)\)", word)
    if seq:
        first, step, last = map(int, seq.groups())
        return [str(n) for n in range(first, last + 1, step)]
    if flag in UNRESOLVED:
        return [UNRESOLVED[flag]]
    raise AssertionError(f"{flag} {word}: a shell value this test cannot resolve")


def local_line(line: list[str], paths: dict[str, str]) -> list[str]:
    flag, words = line[0], line[1:]
    if flag in ("--hf-checkpoint", "--ref-load"):
        return [flag, paths["model"]]
    if flag in ("--load", "--save"):
        return [flag, paths["save"]]
    if flag == "--prompt-data":
        return [flag, paths["data"]]
    if flag == "--eval-prompt-data":  # NAME PATH pairs
        return [flag] + [paths["data"] if i % 2 else w for i, w in enumerate(words)]
    return [flag] + [value for word in words for value in shell_value(flag, word)]


def check_problems(error: ConfigError, flags: set[str]) -> None:
    """Each problem of a failed check names one of ``flags``."""
    lines = [line.strip() for line in str(error).splitlines()[1:]] or [str(error).split(": ", 1)[1]]
    for line in lines:
        named = set(re.findall(r"--[a-z0-9-]+", line))
        assert named & flags, f"a problem that names none of the expected flags: {line}"


def test_the_corpus_records_its_source() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", CORPUS["commit"]) and CORPUS["source"].endswith("THUDM/slime")
    assert len(CORPUS["parser_flags"]) > 200 and len(SCRIPTS) >= 29
    assert "scripts/run-qwen3-0.6B-single-gpu.sh" in SCRIPTS and "scripts/run-qwen3-4B.sh" in SCRIPTS
    assert all(s["args"] and re.fullmatch(r"[0-9a-f]{40}", s["commit"]) for s in SCRIPTS.values())


def test_every_flag_of_slimes_parser_is_understood() -> None:
    for flag in CORPUS["parser_flags"]:
        if flag not in OWN_FLAGS:
            message = rejection(flag)
            assert message and "sluice does not take" in message, f"{flag}: unknown"


def test_every_commented_out_flag_of_the_scripts_is_understood() -> None:
    """Flags a user may switch on by uncommenting a line (``# --use-tis``) are sluice's or refused with a reason."""
    commented = {flag for script in SCRIPTS.values() for flag in script["commented_flags"]}
    assert {"--use-wandb", "--kl-coef", "--fp8-param-gather"} <= commented
    assert sorted(f for f in commented if f not in OWN_FLAGS and rejection(f) is None) == []


@pytest.mark.parametrize("path", sorted(SCRIPTS))
def test_script_runs_through_the_parser_and_checks(path, local_paths) -> None:
    argv, given = [], set()
    for line in SCRIPTS[path]["args"]:
        flag = line[0]
        given.add(flag)
        if flag in OWN_FLAGS:
            argv += local_line(line, local_paths)
            continue
        message = rejection(flag)
        assert message is not None, f"{path}: {flag} is unknown"
        row = FLAGS.get(flag)
        listed = (row is not None and row.treatment is Treatment.REJECTED) or flag.startswith(tuple(REJECTED_PREFIXES))
        assert listed and len(message.split(": ", 1)[1]) > 20, f"{path}: {message}"
    config = parse_config(argv)  # raises on any flag or value the parser refuses
    # run-kimi-k2-Instruct.sh's train line loses its trailing backslash after 4 flags, so bash passes only those:
    # a list without --hf-checkpoint is not held to the requirements of a training run.
    try:
        validate(config, for_training="--hf-checkpoint" in given)
    except ConfigError as error:  # e.g. a parallel size above 1: the message names the script's flag
        check_problems(error, given)
    try:  # the script's model is not the tiny one: mismatches must name Megatron architecture flags
        check_against_checkpoint(config, lambda _: None)
    except ConfigError as error:
        check_problems(error, {f for f, row in FLAGS.items() if row.treatment is Treatment.CHECKED})
