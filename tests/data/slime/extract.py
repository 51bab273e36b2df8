"""Regenerates flags.json: the flags of slime's parser and the argument lists of slime's example scripts.

Usage: python tests/data/slime/extract.py SLIME_GIT_DIR COMMIT [EXTRA_SCRIPT_COMMIT:PATH ...] > flags.json

Reads files with ``git show COMMIT:path`` (no work tree needed). The parser's flags are the string options of
every ``add_argument`` call in slime/utils/arguments.py and slime/backends/sglang_utils/arguments.py (SGLang's
and sglang-router's own options, which slime adds by prefixing SGLang's parser, are not listed: they come from
those packages). A script's argument list is what its ``python3 train.py`` line passes: the inline flags plus the
``${NAME[@]}`` arrays it expands, a ``MODEL_ARGS`` array coming from the ``scripts/models/*.sh`` file it sources.
Commented-out argument lines are listed apart (``commented_flags``); ``${VAR:-default}`` becomes the default and ``$VAR`` a plain assignment's value where the
script has one, other shell values stay as written (the test replaces them).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys

PARSER_FILES = ("slime/utils/arguments.py", "slime/backends/sglang_utils/arguments.py")
_ARRAY_START = re.compile(r"^\s*([A-Z_]+)=\((.*)$")
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)=(\"?\$\{[A-Z0-9_]+:-[^}]*\}\"?|[^\s$`(]*)\s*$")
_EXPAND = re.compile(r"^\$\{([A-Z_]+)\[@\]\}$")
_DEFAULTED = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")
_PLAIN_VAR = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")
_SUBSHELL = re.compile(r"\$\(\(.*?\)\)|\$\([^()]*\)")
_SOURCED_MODEL = re.compile(r"source .*?([\w.-]+\.sh)")


def git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def parser_flags(source: str) -> list[str]:
    """The '--' options of every add_argument call, in file order."""
    flags = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    flags.append(arg.value)
    return flags


def _code_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        lines.append(line)
    return lines


def _words(line: str) -> list[str]:
    """Shell words of one line; a ``$(...)`` or ``$((...))`` expression stays one word, as bash would keep it."""
    kept: list[str] = []

    def hide(match: re.Match) -> str:
        kept.append(match.group(0))
        return f"@@{len(kept) - 1}@@"

    line = _SUBSHELL.sub(hide, line)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: keep the plain words
        words = line.split("#", 1)[0].split()
    return [re.sub(r"@@(\d+)@@", lambda m: kept[int(m.group(1))], w) for w in words]


def argument_lines(argv: list[str]) -> list[list[str]]:
    """Groups a flat argument list into one list per flag: the flag and the words up to the next flag."""
    lines: list[list[str]] = []
    for word in argv:
        if word.startswith("--") or not lines:
            lines.append([word])
        else:
            lines[-1].append(word)
    return lines


def arrays_and_assignments(text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    arrays: dict[str, list[str]] = {}
    assignments: dict[str, str] = {}
    name = None
    for line in _code_lines(text):
        if name is None:
            start = _ARRAY_START.match(line)
            if start:
                name, rest = start.group(1), start.group(2)
                arrays[name] = []
                line = rest
            else:
                assign = _ASSIGN.match(line)
                if assign:
                    assignments[assign.group(1)] = _resolve(assign.group(2).strip("\"'"), assignments)
                continue
        closed = _SUBSHELL.sub("", line).rstrip().endswith(")")  # not the ")" of a $(...) value
        body = line.rstrip()[:-1] if closed else line
        arrays[name].extend(_words(body))
        if closed:
            name = None
    return arrays, assignments


def train_line(text: str) -> tuple[str, list[str]]:
    """The entry point (train.py / train_async.py) and the words after it, up to the end of the command."""
    lines = _code_lines(text)
    for index, line in enumerate(lines):
        found = re.search(r"python3?\s+\S*?(train\w*\.py)\b(.*)$", line)
        if not found:
            continue
        words, rest = [], found.group(2)
        while True:
            continued = rest.rstrip().endswith("\\")
            words.extend(_words(rest.rstrip().rstrip("\\")))
            index += 1
            if not continued or index >= len(lines):
                return found.group(1), words
            rest = lines[index]
    raise ValueError("no python3 train*.py line")


def _resolve(word: str, assignments: dict[str, str]) -> str:
    word = _DEFAULTED.sub(lambda m: m.group(1).strip("\"'"), word)
    return _PLAIN_VAR.sub(lambda m: assignments.get(m.group(1), m.group(0)), word)


def commented_flags(text: str) -> list[str]:
    """Flags of commented-out argument lines (``# --use-tis``): a user may switch them on."""
    flags = []
    for line in text.splitlines():
        body = line.strip().lstrip("#").strip()
        if line.strip().startswith("#") and body.startswith("--"):
            flags += [w for w in _words(body.replace("#", " ")) if re.fullmatch(r"--[a-z][a-z0-9-]*", w)]
    return sorted(set(flags))


def script_argv(repo: str, commit: str, path: str) -> dict:
    text = git_show(repo, commit, path)
    arrays, assignments = arrays_and_assignments(text)
    model_script = None
    sourced = [m.group(1) for line in _code_lines(text) if (m := _SOURCED_MODEL.search(line))]
    if sourced and "MODEL_ARGS" not in arrays:
        model_script = "scripts/models/" + sourced[0]
        model_arrays, model_assignments = arrays_and_assignments(git_show(repo, commit, model_script))
        arrays["MODEL_ARGS"] = [_resolve(w, model_assignments) for w in model_arrays["MODEL_ARGS"]]
    entry, words = train_line(text)
    argv = []
    for word in words:
        expanded = _EXPAND.match(word)
        argv.extend(arrays.get(expanded.group(1), []) if expanded else [word])  # bash: unset is empty
    argv = [_resolve(w, assignments) for w in argv]
    return {"path": path, "commit": commit, "entry": entry, "model_script": model_script,
            "commented_flags": commented_flags(text), "args": argument_lines(argv)}


def main() -> None:
    repo, commit, *extra = sys.argv[1:]
    names = subprocess.run(["git", "--git-dir", repo, "ls-tree", "-r", "--name-only", commit, "scripts"],
                           check=True, capture_output=True, text=True).stdout.split()
    scripts = [(commit, p) for p in names if p.endswith(".sh") and not p.startswith("scripts/models/")]
    scripts += [tuple(item.split(":", 1)) for item in extra]
    flags = sorted({f for path in PARSER_FILES for f in parser_flags(git_show(repo, commit, path))})
    out = {
        "source": "https://github.com/THUDM/slime",
        "generated_by": "python tests/data/slime/extract.py SLIME_GIT_DIR " + " ".join(sys.argv[2:]),
        "commit": commit,
        "parser_files": list(PARSER_FILES),
        "parser_flags": flags,
        "scripts": [script_argv(repo, c, p) for c, p in sorted(scripts, key=lambda s: s[1])],
    }
    sys.stdout.write(_dump(out) + "\n")


def _dump(out: dict) -> str:
    """JSON with one argument line (a flag and its words) per text line, so a diff shows the flags that changed."""
    text = json.dumps({**out, "scripts": "SCRIPTS"}, indent=1)
    scripts = []
    for script in out["scripts"]:
        head = json.dumps({k: v for k, v in script.items() if k != "args"})[:-1]
        lines = ",\n   ".join(json.dumps(line) for line in script["args"])
        scripts.append(f'  {head}, "args": [\n   {lines}\n  ]}}')
    return text.replace('"SCRIPTS"', "[\n" + ",\n".join(scripts) + "\n ]")


if __name__ == "__main__":
    main()
