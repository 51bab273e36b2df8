"""Every plug-in of a run, loaded and checked at start-up, before the tokenizer, data or any model is loaded.

``load_hooks`` turns the hook flags into one typed record; each failure is a ConfigError naming its flag, the
path and the expected signature (docs/customization.md has the table). Anything that needs the engine or the
tokenizer (the gateway, the agent's generate function, the data source) is built later from what is checked here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sluice.config import Config, ConfigError, config_to_dict
from sluice.config.sections import SFT_ROLLOUT_FUNCTION
from sluice.data.custom_source import DataSourceFactory, load_data_source
from sluice.plugins import Plugin, PluginError, load_plugin, slime_args
from sluice.rewards import GroupRewardFn, RewardFn, RewardSettings, get_group_reward_fn, get_reward_fn
from sluice.rollout.agent import CONTRACT as AGENT_CONTRACT
from sluice.rollout.buffer_filter import BufferFilter, load_buffer_filter
from sluice.rollout.dynamic_sampling import GroupFilter, load_group_filter
from sluice.rollout.evaluation import EvalFn, load_eval_fn
from sluice.rollout.generate import load_generate_fn
from sluice.rollout.step import RolloutFn, load_rollout_fn
from sluice.rollout.tools import ToolBox, load_tools
from sluice.trainer.custom_advantage import AdvantageFn, load_custom_advantage
from sluice.trainer.custom_loss import CustomLossFn, load_custom_loss


@dataclass
class Hooks:
    """The run's plug-ins; None where the flag is unset (the built-in behaviour applies)."""

    slime_args: Any  # the namespace slime-style plug-ins receive as `args`
    reward: RewardFn | None = None
    group_reward: GroupRewardFn | None = None
    generate: Callable[..., Any] | None = None
    tools: ToolBox | None = None
    agent: Plugin | None = None  # --agent-function-path, run through the gateway
    rollout: RolloutFn | None = None
    evaluate: EvalFn | None = None
    group_filter: GroupFilter | None = None
    buffer_filter: BufferFilter | None = None
    advantage: AdvantageFn | None = None
    loss: CustomLossFn | None = None
    data_source: DataSourceFactory | None = None
    slime_http: list[str] = field(default_factory=list)  # flags of slime-style plug-ins that call SGLang's HTTP API

    @property
    def needs_gateway(self) -> bool:
        return self.agent is not None or bool(self.slime_http)


def _flag_of(error: Exception, default: str) -> str:
    text = str(error)
    return "" if text.startswith("--") else default + ": "


def _load(flag: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except PluginError:
        raise
    except (ValueError, ImportError, TypeError) as error:
        raise ConfigError(f"{_flag_of(error, flag)}{error}") from error


def load_trainer_hooks(config: Config) -> Hooks:
    """Only the hooks a trainer process calls (advantage and loss functions): a trainer actor need not import
    the rollout's plug-ins, which live with the rollout in the driver."""
    algo = config.algorithm
    hooks = Hooks(slime_args(config_to_dict(config)))
    _load_trainer_hooks(hooks, algo)
    return hooks


def _load_trainer_hooks(hooks: Hooks, algo) -> None:
    if algo.custom_advantage_function_path:
        hooks.advantage = _load("--custom-advantage-function-path",
                                lambda: load_custom_advantage(algo.custom_advantage_function_path, hooks.slime_args))
    if algo.loss_type == "custom_loss" and algo.custom_loss_function_path:
        hooks.loss = _load("--custom-loss-function-path", lambda: load_custom_loss(algo.custom_loss_function_path))


def load_hooks(config: Config) -> Hooks:
    """Load every hook flag of ``config``; raises ConfigError (PluginError) naming the first bad one."""
    rollout, reward, algo = config.rollout, config.reward, config.algorithm
    hooks = Hooks(slime_args(config_to_dict(config)))
    args = hooks.slime_args
    if reward.group_rm:
        hooks.group_reward = _load("--custom-rm-path", lambda: get_group_reward_fn(reward.custom_rm_path, args))
    elif reward.rm_type or reward.custom_rm_path:
        flag = "--custom-rm-path" if reward.custom_rm_path else "--rm-type"
        settings = RewardSettings(reward.rm_url, reward.rm_timeout, reward.rm_max_retries, reward.rm_max_connections,
                                  seed=config.data.rollout_seed)
        hooks.reward = _load(flag, lambda: get_reward_fn(reward.rm_type, reward.custom_rm_path, args, settings))
    if rollout.custom_generate_function_path:
        hooks.generate = _load("--custom-generate-function-path",
                               lambda: load_generate_fn(rollout.custom_generate_function_path, args))
        if hooks.generate.slime_form:
            hooks.slime_http.append("--custom-generate-function-path")
    if rollout.tools:
        hooks.tools = _load("--tools", lambda: load_tools(rollout.tools))
    if rollout.agent_function_path:
        hooks.agent = _load("--agent-function-path", lambda: load_plugin(rollout.agent_function_path, AGENT_CONTRACT))
    if rollout.rollout_function_path:
        path = SFT_ROLLOUT_FUNCTION if rollout.sft_from_data else rollout.rollout_function_path  # "sft": an alias
        hooks.rollout = _load("--rollout-function-path", lambda: load_rollout_fn(path, args))
        if hooks.rollout.slime_form:
            hooks.slime_http.append("--rollout-function-path")
    if config.eval.eval_function_path:
        hooks.evaluate = _load("--eval-function-path", lambda: load_eval_fn(config.eval.eval_function_path, args))
        if hooks.evaluate.slime_form:
            hooks.slime_http.append("--eval-function-path")
    if rollout.dynamic_sampling_filter_path:
        hooks.group_filter = _load("--dynamic-sampling-filter-path",
                                   lambda: load_group_filter(rollout.dynamic_sampling_filter_path, args))
    if rollout.buffer_filter_path:
        hooks.buffer_filter = _load("--buffer-filter-path",
                                    lambda: load_buffer_filter(rollout.buffer_filter_path, args))
    _load_trainer_hooks(hooks, algo)
    if config.data.data_source_path:
        hooks.data_source = _load("--data-source-path", lambda: load_data_source(config.data.data_source_path))
    return hooks
