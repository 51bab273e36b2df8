"""Wiring the run's hooks into the rollout: the generate context and function, the gateway, the manager.

Which generate function runs, in order: ``--custom-generate-function-path``; ``--agent-function-path`` (through
the gateway); the built-in multi-turn tool generate with ``--tools``; else single-turn. The gateway is started
when an agent or a slime-style plug-in needs HTTP; slime plug-ins then find it at ``args.sglang_router_ip/port``.
The gateway listens on 127.0.0.1. For an agent it takes a random key of the run's, which the agent gets as
``AgentTask.api_key``; a slime-style plug-in calls it as it calls SGLang in slime, without a key, so then it has
none (loopback only).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from sluice.config import Config, DataConfig
from sluice.engine.clients.protocol import EngineClient
from sluice.orchestration.hooks import Hooks
from sluice.rewards.overlong import OverlongShaping
from sluice.rollout.agent import load_agent_generate
from sluice.rollout.gateway import AgentGateway
from sluice.rollout.generate import GenerateContext, generate_single_turn
from sluice.rollout.manager import RolloutManager
from sluice.rollout.multi_turn import generate_with_tools
from sluice.rollout.seeds import RolloutSeeds


def prompt_data_config(config: Config, hooks: Hooks) -> DataConfig:
    """The data settings prompts are rendered with: with --tools, the chat template also gets the tool schemas;
    SFT from data without --response-key reads each --input-key value as a whole conversation (slime's layout),
    and no label (--label-key is for its eval sets: nothing scores a training row)."""
    data = config.data
    if config.rollout.sft_from_data:
        data = dataclasses.replace(data, response_key=data.response_key or data.input_key, label_key=None)
    if hooks.tools is None:
        return data
    kwargs = {**data.apply_chat_template_kwargs, "tools": hooks.tools.schemas()}
    return dataclasses.replace(data, apply_chat_template_kwargs=kwargs)


def eval_data_config(config: Config, hooks: Hooks) -> DataConfig:
    """The data settings eval prompts are rendered with: the training prompts', but an eval row is a prompt to
    generate from and its label (--label-key), never an SFT response to train on."""
    return dataclasses.replace(prompt_data_config(config, hooks), response_key=None, label_key=config.data.label_key)


def build_rollout(config: Config, hooks: Hooks, client: EngineClient, tokenizer: Any,
                  context_len: int) -> tuple[RolloutManager, AgentGateway | None]:
    """The rollout manager of the run and, where needed, the started gateway (stop it when the run ends)."""
    template_kwargs = prompt_data_config(config, hooks).apply_chat_template_kwargs
    ctx = GenerateContext(client, tokenizer, tools=hooks.tools, max_turns=config.rollout.max_turns,
                          chat_template_kwargs=dict(template_kwargs))
    gateway = None
    if hooks.needs_gateway:
        agent_only = not hooks.slime_http  # slime-style plug-ins call /generate without a key
        gateway = AgentGateway(client, tokenizer, context_len,
                               chat_template_kwargs=config.data.apply_chat_template_kwargs,
                               api_key=secrets.token_urlsafe(32) if agent_only else None)
        gateway.start()
        hooks.slime_args.sglang_router_ip, hooks.slime_args.sglang_router_port = gateway.host, gateway.port
    if hooks.generate is not None:
        generate_fn = hooks.generate
    elif hooks.agent is not None:
        generate_fn = load_agent_generate(hooks.agent.path, gateway)
    elif hooks.tools is not None:
        generate_fn = generate_with_tools
    else:
        generate_fn = generate_single_turn
    reward = config.reward
    overlong = None
    if reward.overlong_buffer_len is not None:
        overlong = OverlongShaping(config.rollout.rollout_max_response_len, reward.overlong_buffer_len,
                                   reward.overlong_penalty_factor)
    manager = RolloutManager(ctx, hooks.reward, max_concurrency=config.rollout.rollout_max_concurrency,
                             generate_fn=generate_fn, reward_key=reward.reward_key, overlong=overlong,
                             group_reward_fn=hooks.group_reward, reward_timeout_s=reward.reward_timeout or None,
                             seeds=RolloutSeeds(config.data.rollout_seed))
    return manager, gateway

