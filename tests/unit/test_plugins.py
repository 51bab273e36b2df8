"""Plug-in contracts: every hook loads its reference plug-in by dotted path and by file path; a wrong signature,
a missing attribute or module, an async function where a sync one is called are start-up errors naming the flag,
the path and the expected signature; slime's forms get `args`; a run fails on them before any model loads."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
import torch

from sluice.config import ConfigError, parse_config, validate
from sluice.orchestration.hooks import load_hooks
from sluice.plugins import Contract, PluginError, check_form, load_plugin, slime_args, split_path
from sluice.rewards.custom import REWARD_CONTRACT
from sluice.types import Sample, SampleGroup, Status, TrainBatch

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "examples" / "plugins"

# flag -> (reference plug-in as 'module:function' under examples/plugins, extra flags it needs)
REFERENCE = {
    "--custom-rm-path": ("rewards:exact_with_length_penalty", []),
    "--rollout-function-path": ("rollout:hardest_first", []),
    "--custom-generate-function-path": ("rollout:retry_once", []),
    "--eval-function-path": ("rollout:accuracy_by_task", []),
    "--dynamic-sampling-filter-path": ("filters:some_right_some_wrong", []),
    "--buffer-filter-path": ("filters:most_varied", []),
    "--custom-advantage-function-path": ("training:leave_one_out", []),
    "--custom-loss-function-path": ("training:reinforce", ["--loss-type", "custom_loss"]),
    "--data-source-path": ("data:AdditionStream", []),
    "--agent-function-path": ("agent:answer_then_check", []),
}
BASE = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rollout-batch-size", "2"]

BAD = textwrap.dedent('''
    def no_args():
        return 1.0

    def three(a, b, c):
        return 1.0

    def one(x):
        return x

    def keyword_only(sample, *, scale):
        return 1.0

    async def asynchronous(group_samples):
        return True

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch):
    (tmp_path / "bad_plugins.py").write_text(BAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "bad_plugins.py"


def hooks_of(*flags: str):
    config = parse_config(BASE + list(flags))
    validate(config, for_training=False)
    return load_hooks(config)


@pytest.mark.parametrize("flag", sorted(REFERENCE))
@pytest.mark.parametrize("form", ["dotted", "file"])
def test_every_hook_loads_its_reference_plugin(flag, form):
    target, extra = REFERENCE[flag]
    module, name = target.split(":")
    path = f"examples.plugins.{module}.{name}" if form == "dotted" else f"{PLUGINS / module}.py:{name}"
    hooks = hooks_of(flag, path, *extra)
    loaded = {"--custom-rm-path": hooks.reward, "--rollout-function-path": hooks.rollout,
              "--custom-generate-function-path": hooks.generate, "--eval-function-path": hooks.evaluate,
              "--dynamic-sampling-filter-path": hooks.group_filter, "--buffer-filter-path": hooks.buffer_filter,
              "--custom-advantage-function-path": hooks.advantage, "--custom-loss-function-path": hooks.loss,
              "--data-source-path": hooks.data_source, "--agent-function-path": hooks.agent}[flag]
    assert loaded is not None


def test_group_rm_and_tools_load():
    hooks = hooks_of("--custom-rm-path", "examples.plugins.rewards:rank_in_group", "--group-rm")
    samples = [Sample(prompt="q", label="4", response=r, response_length=len(r)) for r in ("4", "44", "4 ")]
    assert asyncio.run(hooks.group_reward(samples)) == [1.5, 0.0, 1.0]
    hooks = hooks_of("--tools", "examples/calculator_agent/tools.py:calculator", "--apply-chat-template")
    schema = hooks.tools.schemas()[0]["function"]
    assert schema["name"] == "calculator" and schema["parameters"]["required"] == ["expression"]
    assert schema["parameters"]["properties"] == {"expression": {"type": "string"}}


@pytest.mark.parametrize(("flag", "target", "message"), [
    ("--custom-rm-path", "bad_plugins.no_args", r"takes \(\); expected sluice's \[async\] fn\(sample: Sample\)"),
    ("--custom-rm-path", "bad_plugins.three",
     r"takes \(a, b, c\); expected .* or slime's \[async\] fn\(args, sample\)"),
    ("--custom-rm-path", "bad_plugins.keyword_only", "required keyword-only parameters"),
    ("--custom-rm-path", "bad_plugins.NOT_A_FUNCTION", "it is a int, not a function"),
    ("--custom-rm-path", "bad_plugins.missing", "module 'bad_plugins' has no attribute 'missing'"),
    ("--custom-rm-path", "no_such_module_xyz.fn", "cannot import 'no_such_module_xyz'"),
    ("--custom-rm-path", "justaname", "must look like"),
    ("--dynamic-sampling-filter-path", "bad_plugins.asynchronous", "is async; this hook calls it synchronously"),
    ("--buffer-filter-path", "bad_plugins.no_args", r"expected sluice's fn\(groups: list\[SampleGroup\], num_groups"),
    ("--rollout-function-path", "bad_plugins.no_args", r"or slime's fn\(args, rollout_id, data_source"),
    ("--eval-function-path", "bad_plugins.keyword_only", "required keyword-only"),
    ("--custom-advantage-function-path", "bad_plugins.three", r"fn\(inputs: AdvantageInputs\)"),
    ("--custom-generate-function-path", "bad_plugins.no_args", r"ctx: GenerateContext\)"),
    ("--custom-generate-function-path", "bad_plugins.three", "the function is not async"),
    ("--data-source-path", "bad_plugins.no_args", r"make\(prompts: list\[Sample\], seed: int\)"),
    ("--data-source-path", "bad_plugins.one", "takes one argument but has no get_samples"),
    ("--agent-function-path", "bad_plugins.three", r"fn\(task: AgentTask\)"),
    ("--tools", "bad_plugins.keyword_only", "parameter 'sample' has no type annotation"),
])
def test_a_bad_plugin_is_a_config_error_naming_flag_path_and_signature(bad_plugins, flag, target, message):
    extra = ["--apply-chat-template"] if flag == "--tools" else []
    with pytest.raises(ConfigError, match=message) as error:
        hooks_of(flag, target, *extra)
    assert str(error.value).startswith(flag) and target in str(error.value)


def test_file_paths_name_the_file(bad_plugins):
    with pytest.raises(PluginError, match="no such file"):
        load_plugin("/no/such/dir/r.py:fn", REWARD_CONTRACT)
    with pytest.raises(PluginError, match="name the function too"):
        load_plugin(str(bad_plugins), REWARD_CONTRACT)
    broken = bad_plugins.parent / "broken.py"
    broken.write_text("raise RuntimeError('at import')\n")
    with pytest.raises(PluginError, match="importing .*broken.py failed: RuntimeError: at import"):
        load_plugin(f"{broken}:fn", REWARD_CONTRACT)


def test_path_forms_and_one_module_per_file():
    assert split_path("pkg.mod.fn", "--x") == ("pkg.mod", "fn")
    assert split_path("pkg.mod:Cls.method", "--x") == ("pkg.mod", "Cls.method")
    assert split_path("dir/file.py:fn", "--x") == ("dir/file.py", "fn")
    first = load_plugin(f"{PLUGINS / 'rewards.py'}:exact_with_length_penalty", REWARD_CONTRACT)
    second = load_plugin(f"{PLUGINS / 'rewards.py'}:slime_style", check_contract := Contract(
        "--x", "fn(sample)", 1, "fn(args, sample)", 2))
    assert first.fn.__module__ == second.fn.__module__  # the file is imported once
    assert second.slime_form and not first.slime_form and check_contract.slime


def test_forms_are_told_apart_by_arity_then_by_the_name_args():
    contract = Contract("--x", "fn(sample, params, ctx)", 3, "fn(args, sample, params)", 3)

    async def ours(sample, sampling_params, ctx):
        return sample

    async def theirs(args, sample, sampling_params):
        return sample

    assert not check_form(ours, contract, "ours").slime_form
    assert check_form(theirs, contract, "theirs").slime_form
    reward = Contract("--x", "fn(sample)", 1, "fn(args, sample)", 2)
    assert check_form(lambda args, sample: 1.0, reward, "l").slime_form
    assert not check_form(lambda sample, scale=2.0: 1.0, reward, "l").slime_form
    assert not check_form(lambda *samples: 1.0, reward, "l").slime_form


def test_slime_style_plugins_get_args_with_slime_names():
    hooks = hooks_of("--custom-rm-path", "examples.plugins.rewards.slime_style", "--rollout-max-response-len", "4")
    args = hooks.slime_args
    assert args.rollout_max_response_len == 4 and args.rollout_batch_size == 2 and args.n_samples_per_prompt == 1
    assert args.custom_rm_path == "examples.plugins.rewards.slime_style" and args.partial_rollout is False
    assert args.sglang_router_ip is None  # set to the gateway when a slime plug-in needs HTTP
    right = Sample(prompt="q", label="7", response="7", response_length=1)
    cut = Sample(prompt="q", label="7", response="7   ", response_length=4)  # right, but at the budget
    assert asyncio.run(hooks.reward(right)) == 1.0 and asyncio.run(hooks.reward(cut)) == 0.5
    assert slime_args({"rm_type": "math"}, sglang_router_port=5).sglang_router_port == 5


def test_slime_style_filter_advantage_and_buffer_forms(tmp_path, monkeypatch):
    (tmp_path / "slime_plugins.py").write_text(textwrap.dedent('''
        import torch

        def advantages(args, rollout_data):
            rollout_data["advantages"] = [torch.full_like(m, r) for m, r in
                                          zip(rollout_data["loss_masks"], rollout_data["rewards"])]

        def buffer(args, rollout_id, buffer, num_samples):
            return buffer[-num_samples:]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    hooks = hooks_of("--custom-advantage-function-path", "slime_plugins.advantages",
                     "--buffer-filter-path", "slime_plugins.buffer")
    from sluice.trainer.custom_advantage import AdvantageInputs

    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    batch = TrainBatch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), mask,
                       torch.zeros(2, 4), torch.zeros(2, 4))
    out = hooks.advantage(AdvantageInputs([[2.0, -1.0]], batch, [1, 2], [2, 2]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, -1.0, -1.0]]))
    groups = [SampleGroup([Sample(prompt=str(i))]) for i in range(4)]
    assert [g.prompt for g in hooks.buffer_filter(groups, 2, 0)] == ["2", "3"]


def test_a_bad_plugin_fails_the_run_before_any_model_loads(bad_plugins, small_checkpoint, tmp_path):
    from sluice.orchestration import build_run

    config = parse_config(["--hf-checkpoint", small_checkpoint, "--prompt-data", str(tmp_path / "never-read.jsonl"),
                           "--rollout-batch-size", "2", "--rm-type", "exact", "--label-key", "label",
                           "--buffer-filter-path", "bad_plugins.three", "--run-dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="--buffer-filter-path 'bad_plugins.three'"):
        build_run(config, log=lambda line: None)


@pytest.mark.parametrize(("extra", "message"), [
    (["--group-rm"], "--group-rm needs --custom-rm-path"),
    (["--rm-type", "remote_rm"], "--rm-type remote_rm needs --rm-url"),
    (["--rm-type", "exact", "--rm-url", "http://x"], "--rm-url has no effect with --rm-type exact"),
    (["--max-turns", "3"], "--max-turns has no effect without --tools"),
    (["--tools", "a.b"], "--tools needs --apply-chat-template"),
    (["--agent-function-path", "a.b", "--tools", "c.d", "--apply-chat-template"], "both choose how samples"),
    (["--rollout-function-path", "a.b", "--over-sampling-batch-size", "4"], "replaces the whole rollout step"),
    (["--custom-advantage-function-path", "a.b", "--advantage-estimator", "ppo"], "cannot replace"),
    (["--max-failed-sample-ratio", "1.5"], r"--max-failed-sample-ratio must be in \[0, 1\]"),
    (["--reward-timeout", "-1"], "--reward-timeout must be >= 0"),
])
def test_hook_flag_checks_name_their_flags(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(BASE + ["--label-key", "label"] + extra))


def test_rewards_elsewhere_and_label_free_rewards_are_valid():
    no_reward = BASE + ["--n-samples-per-prompt", "2"]
    validate(parse_config(no_reward + ["--agent-function-path", "a.b"]))
    validate(parse_config(no_reward + ["--rm-type", "random"]))  # no --label-key needed
    validate(parse_config(["--hf-checkpoint", "m", "--data-source-path", "a.B", "--rollout-batch-size", "2",
                           "--n-samples-per-prompt", "2", "--rm-type", "exact", "--label-key", "label"]))
    assert Status.FAILED.value == "failed"


def test_the_docs_table_lists_every_hook_with_its_example():
    docs = (ROOT / "docs" / "customization.md").read_text()
    table = docs[docs.index("## Every hook"):docs.index("### Rewards")]
    for flag in [*REFERENCE, "--tools", "--group-rm"]:
        assert f"`{flag}" in table, flag
    for target, _ in REFERENCE.values():
        module, name = target.split(":")
        assert f"def {name}" in (PLUGINS / f"{module}.py").read_text() or f"class {name}" in (
            PLUGINS / f"{module}.py").read_text()
        assert name in docs, name


def test_module_not_on_import_path_suggests_file_form_and_pythonpath(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_local_rm.py").write_text("def fn(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)  # the file is here, but the current folder is not on sys.path (as for `sluice train`)
    with pytest.raises(PluginError) as caught:
        load_plugin("my_local_rm.fn", REWARD_CONTRACT)
    message = str(caught.value)
    assert "--custom-rm-path 'my_local_rm.fn': cannot import 'my_local_rm'" in message
    assert f"my_local_rm.py is in {tmp_path} but not on Python's import path: name it as 'my_local_rm.py:fn', " \
           "or run with PYTHONPATH=." in message
    assert load_plugin("my_local_rm.py:fn", REWARD_CONTRACT).name == "fn"
    with pytest.raises(PluginError, match=r"if it is a file, name it as 'path/to/file\.py:score', or add its folder "
                                          "to PYTHONPATH"):
        load_plugin("absent_pkg_xyz.rm.score", REWARD_CONTRACT)


def test_missing_dependency_inside_a_plugin_gets_no_path_hint(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "needs_dep_rm.py").write_text("import absent_dependency_xyz\n\ndef fn(sample):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as caught:
        load_plugin("needs_dep_rm.fn", REWARD_CONTRACT)
    assert "No module named 'absent_dependency_xyz'" in str(caught.value)
    assert "PYTHONPATH" not in str(caught.value)
