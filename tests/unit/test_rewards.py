"""Built-in rewards, custom reward loading, and per-sample failure handling in score_samples."""

from __future__ import annotations

import asyncio
import itertools
import textwrap
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sluice.rewards import (
    boxed_exact,
    boxed_math,
    exact_match,
    extract_boxed,
    get_reward_fn,
    math_reward,
    score_samples,
)
from sluice.rewards.contract import as_reward_value
from sluice.types import Sample, Status

HALF = "The answer is $\\frac{1}{2}$"
_module_ids = itertools.count()


# ---- exact ---------------------------------------------------------------------------------------


def test_exact_match_strips_outer_whitespace_only():
    assert exact_match("  42\n", "42") == 1.0
    assert exact_match("42", " 42 ") == 1.0
    assert exact_match("4 2", "42") == 0.0
    assert exact_match("43", "42") == 0.0


def test_exact_match_int_label():
    assert exact_match("42", 42) == 1.0
    assert exact_match("42.0", 42) == 0.0


def test_exact_match_missing_label_raises():
    with pytest.raises(ValueError, match="label"):
        exact_match("42", None)


# ---- math ----------------------------------------------------------------------------------------


def test_math_reward_equivalent_forms():
    assert math_reward(HALF, "0.5") == 1.0
    assert math_reward("so it is 1/2", "\\frac{1}{2}") == 1.0


def test_math_reward_wrong_and_garbage():
    assert math_reward("The answer is $\\frac{1}{3}$", "0.5") == 0.0
    assert math_reward("}}}{{{ \\frac{ no answer at all $$", "0.5") == 0.0
    assert math_reward("", "0.5") == 0.0
    assert math_reward(HALF, "not a number at all") == 0.0


def test_math_reward_bare_latex_label():
    assert math_reward("$x^2 + 1$", "x^2+1") == 1.0


def test_math_reward_in_worker_thread():
    # math_verify's default signal timeout fails off the main thread and would score 0.0 there.
    async def run() -> tuple[float, bool]:
        def call() -> tuple[float, bool]:
            return math_reward(HALF, "0.5"), threading.current_thread() is threading.main_thread()

        return await asyncio.to_thread(call)

    score, on_main = asyncio.run(run())
    assert not on_main
    assert score == 1.0


# ---- boxed ---------------------------------------------------------------------------------------


def test_extract_boxed_nested_and_last():
    assert extract_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed{{a}{b{c}}}") == "{a}{b{c}}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"


def test_extract_boxed_missing_or_unclosed():
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{1} and then \\boxed{\\frac{1}{2") is None


def test_boxed_rewards_score_only_the_box():
    assert boxed_exact("I think 7, so \\boxed{ 42 }", 42) == 1.0
    assert boxed_exact("42", 42) == 0.0
    assert boxed_math("first 0.3 then \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert boxed_math("the answer is 0.5", "0.5") == 0.0
    assert boxed_math("\\boxed{0.25}", "0.5") == 0.0


# ---- registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rm_type", "response", "label"),
    [
        ("exact", "42", 42),
        ("math", HALF, "0.5"),
        ("boxed_exact", "\\boxed{42}", "42"),
        ("boxed_math", "\\boxed{1/2}", "0.5"),
    ],
)
def test_builtin_rewards_through_registry(rm_type, response, label):
    fn = get_reward_fn(rm_type, None)
    assert asyncio.run(fn(Sample(prompt="q", response=response, label=label))) == 1.0
    assert asyncio.run(fn(Sample(prompt="q", response="nope", label=label))) == 0.0


def test_unknown_rm_type_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_reward_fn("fuzzy", None)
    message = str(info.value)
    assert "fuzzy" in message
    for name in ("exact", "math", "boxed_exact", "boxed_math"):
        assert name in message


def test_no_reward_configured():
    with pytest.raises(ValueError, match="rm-type"):
        get_reward_fn(None, None)


def test_bad_dotted_path_names_module():
    with pytest.raises(ImportError, match="no_such_pkg_xyz.mod"):
        get_reward_fn(None, "no_such_pkg_xyz.mod.fn")


def _write_module(tmp_path, monkeypatch, source: str) -> str:
    name = f"sluice_test_rm_{next(_module_ids)}_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_bad_attribute_names_it(tmp_path, monkeypatch):
    module = _write_module(tmp_path, monkeypatch, "def real(sample):\n    return 1.0\n")
    with pytest.raises(ImportError) as info:
        get_reward_fn(None, f"{module}.missing_fn")
    assert "missing_fn" in str(info.value)
    assert module in str(info.value)


def test_malformed_path():
    with pytest.raises(ValueError, match="package.module"):
        get_reward_fn(None, "justaname")


CUSTOM_SOURCE = """
import asyncio
import threading

def ours_sync(sample):
    return 1.0 if sample.response == sample.label else 0.0

async def ours_async(sample):
    await asyncio.sleep(0)
    return {"acc": 1.0 if sample.response == sample.label else 0.0, "len": len(sample.response)}

def slime_sync(args, sample):
    return args.scale * (sample.response == sample.label)

async def slime_async(args, sample, **kwargs):
    return args.scale * 2 if sample.response == sample.label else 0

def thread_name(sample):
    return 0.0 if threading.current_thread() is threading.main_thread() else 1.0

def returns_text(sample):
    return "high"
"""


@pytest.mark.parametrize("separator", [".", ":"])
def test_custom_reward_ours_sync_and_async(tmp_path, monkeypatch, separator):
    module = _write_module(tmp_path, monkeypatch, CUSTOM_SOURCE)
    right = Sample(prompt="q", response="yes", label="yes")
    wrong = Sample(prompt="q", response="no", label="yes")

    sync_fn = get_reward_fn("exact", f"{module}{separator}ours_sync")  # custom path wins over rm_type
    assert asyncio.run(sync_fn(right)) == 1.0
    assert asyncio.run(sync_fn(wrong)) == 0.0

    async_fn = get_reward_fn(None, f"{module}{separator}ours_async")
    assert asyncio.run(async_fn(right)) == {"acc": 1.0, "len": 3.0}
    assert asyncio.run(async_fn(wrong))["acc"] == 0.0


def test_custom_reward_slime_form_gets_args(tmp_path, monkeypatch):
    module = _write_module(tmp_path, monkeypatch, CUSTOM_SOURCE)
    args = SimpleNamespace(scale=3)
    right = Sample(prompt="q", response="yes", label="yes")

    sync_fn = get_reward_fn(None, f"{module}.slime_sync", slime_args=args)
    result = asyncio.run(sync_fn(right))
    assert result == 3.0 and isinstance(result, float)  # bool * int coerced to float

    async_fn = get_reward_fn(None, f"{module}.slime_async", slime_args=args)
    assert asyncio.run(async_fn(right)) == 6.0
    assert asyncio.run(async_fn(Sample(prompt="q", response="no", label="yes"))) == 0.0


def test_sync_custom_reward_runs_off_the_event_loop_thread(tmp_path, monkeypatch):
    module = _write_module(tmp_path, monkeypatch, CUSTOM_SOURCE)
    fn = get_reward_fn(None, f"{module}.thread_name")
    assert asyncio.run(fn(Sample(prompt="q"))) == 1.0


# ---- score_samples -------------------------------------------------------------------------------


def test_score_samples_sets_rewards_and_fails_only_the_raising_sample():
    async def reward(sample: Sample) -> float:
        if sample.index == 1:
            raise RuntimeError("judge unavailable")
        return float(sample.index) / 10

    samples = [Sample(prompt="q", index=i, status=Status.COMPLETED) for i in range(3)]
    asyncio.run(score_samples(reward, samples, max_concurrency=2))

    assert [s.reward for s in samples] == [0.0, 0.0, 0.2]
    assert [s.status for s in samples] == [Status.COMPLETED, Status.FAILED, Status.COMPLETED]
    assert "judge unavailable" in samples[1].metadata["reward_error"]
    assert "reward_error" not in samples[0].metadata


def test_score_samples_respects_max_concurrency():
    in_flight = 0
    peak = 0

    async def reward(sample: Sample) -> float:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return 1.0

    samples = [Sample(prompt="q", index=i) for i in range(10)]
    asyncio.run(score_samples(reward, samples, max_concurrency=3))
    assert peak == 3
    assert all(s.reward == 1.0 for s in samples)


def test_score_samples_bad_return_type_and_timeout(tmp_path, monkeypatch):
    module = _write_module(tmp_path, monkeypatch, CUSTOM_SOURCE)
    bad = Sample(prompt="q")
    asyncio.run(score_samples(get_reward_fn(None, f"{module}.returns_text"), [bad], max_concurrency=1))
    assert bad.status is Status.FAILED and "not a number" in bad.metadata["reward_error"]

    async def slow(sample: Sample) -> float:
        await asyncio.sleep(10)
        return 1.0

    late = Sample(prompt="q")
    asyncio.run(score_samples(slow, [late], max_concurrency=1, timeout_s=0.05))
    assert late.status is Status.FAILED and late.reward == 0.0
    assert "TimeoutError" in late.metadata["reward_error"]


def test_config_and_reward_registry_agree_on_builtin_names():
    from sluice.config import BUILTIN_REWARDS as CONFIG_NAMES
    from sluice.rewards import BUILTIN_REWARDS as REGISTRY

    assert set(CONFIG_NAMES) == set(REGISTRY)


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1.0), (True, 1.0), (0.5, 0.5), (np.float32(0.25), 0.25), (np.int64(2), 2.0), (np.bool_(True), 1.0),
    (np.array(0.5), 0.5), (torch.tensor(0.75), 0.75), ({"acc": 1, "len": np.float64(0.5)}, {"acc": 1.0, "len": 0.5}),
])
def test_reward_values_that_are_numbers(value, expected) -> None:
    assert as_reward_value(value, "my_rm.score") == expected


@pytest.mark.parametrize(("value", "kind"), [
    ("1.0", "str"), (b"1", "bytes"), (None, "NoneType"), ([1.0], "list"), (1j, "complex"), (np.array([1.0]), "ndarray"),
])
def test_reward_value_that_is_not_a_number_names_function_and_type(value, kind) -> None:
    with pytest.raises(TypeError, match=rf"my_rm\.score returned a reward that is not a number: .* \({kind}\)"):
        as_reward_value(value, "my_rm.score")
    with pytest.raises(TypeError, match=rf"my_rm\.score returned a dict whose 'acc' is not a number: .* \({kind}\)"):
        as_reward_value({"acc": value}, "my_rm.score")


def test_reward_returning_numeric_text_fails_the_sample(tmp_path, monkeypatch) -> None:
    module = _write_module(tmp_path, monkeypatch, 'def returns_number_text(sample):\n    return "1.0"\n')
    sample = Sample(prompt="q")
    asyncio.run(score_samples(get_reward_fn(None, f"{module}.returns_number_text"), [sample], max_concurrency=1))
    assert sample.status is Status.FAILED
    assert f"{module}.returns_number_text returned a reward that is not a number: '1.0' (str)" in \
        sample.metadata["reward_error"]
