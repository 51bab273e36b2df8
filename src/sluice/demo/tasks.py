"""Synthetic verifiable tasks written as jsonl prompt files (`input`, `label`, `metadata.task`).

- add: multi-digit addition, "34+58=" -> "92", "07+05=" -> "12". The answer comes most-significant digit first, so
  the model must resolve carries before writing the first digit.
- reverse: "reverse 80512" -> "21508", a multi-step copy that must walk the string backwards.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

TaskMaker = Callable[[random.Random], tuple[str, str]]


def make_addition(rng: random.Random, num_digits: int = 2) -> tuple[str, str]:
    """Operands are zero-padded to ``num_digits`` so digit columns sit at fixed positions; the answer is not."""
    a, b = rng.randrange(10**num_digits), rng.randrange(10**num_digits)
    return f"{a:0{num_digits}d}+{b:0{num_digits}d}=", str(a + b)


def make_reverse(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_len, max_len)))
    return f"reverse {digits}", digits[::-1]


TASKS: dict[str, TaskMaker] = {"add": make_addition, "reverse": make_reverse}


def write_task_file(path: str | Path, task: str, num_rows: int, seed: int, exclude: set[str] = frozenset()) -> Path:
    """Write ``num_rows`` distinct problems of ``task`` not in ``exclude``; returns the path."""
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set(exclude)
    rows = []
    while len(rows) < num_rows:
        prompt, answer = TASKS[task](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"input": prompt, "label": answer, "metadata": {"task": task}})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def read_prompts(path: str | Path) -> set[str]:
    return {json.loads(line)["input"] for line in Path(path).read_text().splitlines() if line.strip()}


def sloppy_answer(task: str, prompt: str, answer: str, rng: random.Random, error_rate: float) -> str:
    """The demo teacher's answer: right, except with probability ``error_rate`` it makes its typical slip.

    add: forgets every carry (each column summed mod 10: 38+45 -> "73"); reverse: stops one digit early.
    A slip that happens to give the right answer (an addition with no carry) stays right.
    """
    if rng.random() >= error_rate:
        return answer
    if task == "add":
        left, right = prompt.rstrip("=").split("+")
        return str(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(left, right))))
    if task == "reverse":
        return answer[:-1]
    raise ValueError(f"no teacher slip defined for task {task!r}")


def write_teacher_file(path: str | Path, train_file: str | Path, error_rate: float, seed: int) -> Path:
    """Demonstrations for the warm start: the training prompts answered by the sloppy teacher."""
    rng = random.Random(f"teacher-{seed}")
    rows = []
    for line in Path(train_file).read_text().splitlines():
        row = json.loads(line)
        row["label"] = sloppy_answer(row["metadata"]["task"], row["input"], row["label"], rng, error_rate)
        rows.append(row)
    out = Path(path)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out
