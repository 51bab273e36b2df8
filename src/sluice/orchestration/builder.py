"""Building a run from its config: every part made, placed (in this process or on Ray actors), wired, and
restored from --load; the loops then call the parts (loops.py).

Order: a Megatron checkpoint in --load is refused first; then the run directory is planned
(orchestration/run_dir.py: another run's records are refused before anything is written); the checkpoints, a
resume's settings, the plug-ins, the data's first rows and the context length are checked; the tokenizer and the
data are loaded (each prompt checked); only then is the run directory made and the config and command line
recorded in it, so a mistake caught so far leaves no files. Then the Data Buffer; the engines (not with
--debug-train-only: rollouts are replayed; for SFT from data, which generates nothing to train on, only when
there are eval sets to generate for); the rollout manager;
the trainer (not with --debug-rollout-only); then a resume from --load, and the trackers, which continue the
resumed run.
A failure part-way stops whatever was started.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from transformers.utils import logging as hf_logging

from sluice.config import Config, ConfigError, config_to_dict
from sluice.checkpoint.megatron_dir import is_torch_dist_checkpoint, torch_dist_refusal
from sluice.checkpoint.store import load_run_state
from sluice.config.megatron_checks import check_against_checkpoint
from sluice.config.sections import BUILTIN_REWARDS, LABEL_FREE_REWARDS
from sluice.data import PromptSource, check_first_row, load_prompt_samples, load_prompt_table
from sluice.models.tokenizer import load_tokenizer
from sluice.observability.progress import ProgressReporter
from sluice.observability.run_record import record_launch
from sluice.observability.samples import SampleLog
from sluice.observability.step_log import StepLog
from sluice.observability.trackers import Trackers
from sluice.orchestration.checkpointing import RunCheckpoints
from sluice.orchestration.context_budget import ModelContext, check_budgets, context_prompt_limit, read_context
from sluice.orchestration.engine_access import protect_engine_servers
from sluice.orchestration.hooks import Hooks, load_hooks
from sluice.orchestration.offload import OffloadTurns
from sluice.orchestration.oom import OomAdvice
from sluice.orchestration.pools import Placement
from sluice.orchestration.resume import check_resumable, read_model_shape
from sluice.orchestration.rollout_setup import build_rollout, eval_data_config, prompt_data_config
from sluice.orchestration.run import Run, stop_parts
from sluice.orchestration.run_dir import RunDirPlan, plan_run_dir
from sluice.orchestration.schedule import Schedule
from sluice.orchestration.sft_eval import SftEval
from sluice.orchestration.weight_updates import WeightUpdates
from sluice.rollout.batches import RolloutBatches
from sluice.rollout.evaluator import Evaluator
from sluice.rollout.finish import BatchFinisher


def build_run(config: Config, log=print, command: list[str] | None = None) -> Run:
    """The run ``config`` asks for, its parts started: in this process, or placed by Ray (--orchestrator ray).

    ``command``: the `sluice train` flags behind ``config``, recorded in the run directory (commands.jsonl) with
    the process's own command line; None where there are none (a run built in code).
    """
    hf_logging.disable_progress_bar()
    _refuse_torch_dist(config)  # before --load is read as a checkpoint of ours
    config, run_dir = plan_run_dir(config)  # before anything is written or loaded; the run dir resolved
    as_given = config  # what the run dir records: the keys and weight roots added next are the run's own
    config = protect_engine_servers(config)  # before any engine server starts: a key of the run's, weight roots
    loop = asyncio.new_event_loop()
    checkpoint = config.model.hf_checkpoint
    placement, gateway, hooks, engines = None, None, None, None
    try:
        _check_checkpoints(config, run_dir, log)
        hooks = load_hooks(config)  # every plug-in, checked before anything heavy loads
        _check_data(config, hooks)
        context = read_context(config, checkpoint)
        check_budgets(config, context)
        tokenizer = _checkpoint_tokenizer(checkpoint)
        source, eval_sets, sft_sets = _load_data(config, hooks, tokenizer, context, log)
        run_dir.apply(log)  # every input checked: only now is anything written (or an old run's records cleared)
        record_launch(run_dir.run_dir, as_given, command, run_dir.checkpoint)
        memory = OomAdvice(config)
        placement = _placement(config, memory, log)
        # Every rollout draws its prompts through the buffer, and checkpoints save the buffer (cursor included).
        buffer = placement.start_buffer(source, config.rollout.n_samples_per_prompt, config.staleness_bound,
                                        held_groups(config))
        buffer_handle = placement.buffer_handle(buffer)
        engines = placement.start_engines() if needs_engines(config) else None
        manager, gateway = build_rollout(config, hooks, engines.client if engines else None, tokenizer,
                                         engines.context_len if engines else 0)
        trains = not config.debug.debug_rollout_only
        trainer = placement.start_trainer(engines, hooks, tokenizer.pad_token_id or 0) if trains else None
        weights = WeightUpdates(trainer, engines, buffer, buffer_handle, loop, log)
        can_recover = engines is not None and engines.can_restart
        manager.recover_engines = weights.recover_engines if can_recover else None
        num_rollout = config.rollout.num_rollout or source.num_rollouts_for_epochs(
            config.rollout.num_epoch, config.rollout.rollout_batch_size)
        checkpoints = RunCheckpoints(config, tokenizer, read_model_shape(checkpoint), log, trainer, buffer)
        resumed = _resume(checkpoints, weights, engines, buffer, loop)
        start_rollout = resumed["rollout_id"] + 1 if resumed else 0
        step_log = _step_log(config, resumed, start_rollout, num_rollout, log)
        finisher = BatchFinisher(manager, memory, config.rollout.max_failed_sample_ratio,
                                 config.debug.save_debug_rollout_data, config.eval.eval_accuracy_threshold,
                                 step_log.samples, scored=not config.rollout.sft_from_data)
        batches = RolloutBatches(manager, buffer, buffer_handle, config.rollout, config.debug, finisher, memory,
                                 step_log.progress, loop, log, rollout_fn=hooks.rollout,
                                 group_filter=hooks.group_filter, buffer_filter=hooks.buffer_filter,
                                 engine_watch=weights.watch_engines if can_recover else None)
        evaluator = Evaluator(manager, eval_sets, config.rollout, config.eval, memory, loop, source, hooks.evaluate,
                              step_log.samples)
        offload = OffloadTurns(config.cluster, engines, trainer, rollout_uses_devices=not config.rollout.sft_from_data)
        return Run(config, tokenizer, source, buffer, engines, trainer, manager, batches, evaluator,
                   SftEval(trainer, sft_sets), weights, offload, checkpoints, step_log,
                   _schedule(config, start_rollout, num_rollout, bool(eval_sets or sft_sets)), placement, loop, gateway,
                   hooks.reward, log)
    except BaseException:
        stop_parts(loop, placement, gateway, [engines.client if engines else None, hooks and hooks.reward], log)
        run_dir.release()
        raise


def needs_engines(config: Config) -> bool:
    """Whether the run generates: not with --debug-train-only (rollouts are replayed); for SFT from data
    (--rollout-function-path sft: the responses are the data's) only to evaluate --eval-prompt-data."""
    if config.debug.debug_train_only:
        return False
    return not config.rollout.sft_from_data or bool(config.eval_sets)


def _placement(config: Config, memory: OomAdvice, log) -> Placement:
    if config.cluster.distributed:
        from sluice.orchestration.ray_placement import RayPlacement  # Ray is imported only for Ray runs

        return RayPlacement(config, log)
    from sluice.orchestration.local_pools import LocalPlacement

    return LocalPlacement(config, memory)


def _check_data(config: Config, hooks: Hooks) -> None:
    """Open each prompt set and look up the key flags in its first row: a wrong path or key fails here."""
    train = [config.data.prompt_data] if config.data.prompt_data is not None else []
    for spec in train + [path for _, path in config.eval_sft_sets]:
        check_first_row(spec, prompt_data_config(config, hooks), text_reward=_text_reward(config))
    for _, spec in config.eval_sets:
        check_first_row(spec, eval_data_config(config, hooks), text_reward=_text_reward(config))


def _text_reward(config: Config) -> str | None:
    """The built-in --rm-type that compares labels as text (None for a custom or label-free reward)."""
    rm_type = config.reward.rm_type
    if config.reward.custom_rm_path is None and rm_type in BUILTIN_REWARDS and rm_type not in LABEL_FREE_REWARDS:
        return rm_type
    return None


def _load_data(config: Config, hooks: Hooks, tokenizer, context: ModelContext | None, log):
    """The prompt source (--prompt-data or --data-source-path), the eval sets and the held-out SFT sets, by name."""
    data = prompt_data_config(config, hooks)
    if hooks.data_source is not None:  # its factory takes every prompt as a list: converted whole, here only
        samples = []
        if config.data.prompt_data is not None:
            samples, report = load_prompt_samples(config.data.prompt_data, data, tokenizer,
                                                 text_reward=_text_reward(config),
                                                 context_limit=context_prompt_limit(config, context, for_eval=False))
            _report_load(config, config.data.prompt_data, report, log)
        source = hooks.data_source(samples, config.data.rollout_seed, data, tokenizer, hooks.slime_args)
    else:
        source = _prompt_source(config, data, tokenizer, context, log)
    eval_sets = {}
    eval_data = eval_data_config(config, hooks)
    for name, path in config.eval_sets:  # every eval uses every prompt of its set: converted whole
        eval_samples, eval_report = load_prompt_samples(
            path, eval_data, tokenizer, text_reward=_text_reward(config),
            context_limit=context_prompt_limit(config, context, for_eval=True))
        _report_load(config, path, eval_report, log)
        eval_sets[name] = eval_samples
    sft_sets = {}
    for name, path in config.eval_sft_sets:  # rows as the training rows: responses and loss masks from the data
        sft_samples, sft_report = load_prompt_samples(
            path, data, tokenizer, context_limit=context_prompt_limit(config, context, for_eval=False))
        _report_load(config, path, sft_report, log)
        sft_sets[name] = sft_samples
    return source, eval_sets, sft_sets


def _prompt_source(config: Config, data, tokenizer, context: ModelContext | None, log) -> PromptSource:
    """--prompt-data's rows as the resumable prompt cursor; a large dataset streams (data/prompt_table.py)."""
    table, report = load_prompt_table(config.data.prompt_data, data, tokenizer, text_reward=_text_reward(config),
                                      context_limit=context_prompt_limit(config, context, for_eval=False))
    if report is not None:
        _report_load(config, config.data.prompt_data, report, log)
    else:
        log(f"{config.data.prompt_data}: {table.num_rows} rows, streamed: each prompt is read and tokenized when a "
            "batch draws it, and a bad row is reported then")
    _warn_batch_beyond_data(config, table.num_usable, log)
    return PromptSource(table, config.data.rollout_shuffle, config.data.rollout_seed)


def _warn_batch_beyond_data(config: Config, num_prompts: int, log) -> None:
    """A rollout larger than the data draws each prompt several times (the source wraps into the next epoch):
    legitimate, but easily a mistake, e.g. a test file's 8 rows under a 512-prompt batch."""
    flag, per_rollout = "--rollout-batch-size", config.rollout.rollout_batch_size
    if config.rollout.over_sampling_batch_size is not None:  # dynamic sampling draws this many per round
        flag, per_rollout = "--over-sampling-batch-size", config.rollout.over_sampling_batch_size
    if per_rollout is not None and 0 < num_prompts < per_rollout:
        log(f"warning: {flag} {per_rollout} is larger than the {num_prompts} prompts of {config.data.prompt_data}: "
            f"each rollout draws every prompt about {per_rollout / num_prompts:.3g} times; lower {flag} to at most "
            f"{num_prompts}, or raise --n-samples-per-prompt for more samples of each prompt")


def _report_load(config: Config, path: str, report, log) -> None:
    """Warnings for what loading left out or changed; both only happen where a flag asked for them."""
    if report.num_dropped_too_long:
        log(f"warning: {path}: dropped {report.num_dropped_too_long} of {report.num_rows} prompts longer "
            f"than --rollout-max-prompt-len {config.data.rollout_max_prompt_len} tokens")
    if report.num_lossy:
        log(f"warning: {path}: {report.num_lossy} of {report.num_rows} prompts contain characters the tokenizer "
            f"cannot represent, loaded without them (--allow-lossy-prompts); the first: {report.first_lossy}")


def _resume(checkpoints: RunCheckpoints, weights: WeightUpdates, engines, buffer, loop) -> dict | None:
    """Restore the run from --load; returns the checkpoint's run state, or None for a fresh start."""
    state = checkpoints.resume()
    if state is not None and checkpoints.trainer is not None:
        weights.sync(version=state.get("weight_version", state["rollout_id"] + 1))
    elif state is not None:  # --debug-rollout-only pushes nothing: the engine keeps the weights it started with
        buffer.set_weight_version(loop.run_until_complete(engines.client.weight_version()) if engines else 0)
    return state


def _step_log(config: Config, resumed: dict | None, start_rollout: int, num_rollout: int, log) -> StepLog:
    # A resume drops the records past its checkpoint; --load with nothing saved yet drops a failed attempt's.
    resume_after_step = start_rollout if resumed else (-1 if config.checkpoint.load else None)
    trackers = Trackers(config.logging, config_to_dict(config), resume_after_step,
                        wandb_run_id=(resumed or {}).get("trackers", {}).get("wandb_run_id"))
    progress = ProgressReporter(num_rollout, enabled=config.logging.progress_bar, initial_step=start_rollout)
    samples = SampleLog(config.logging.run_dir, config.logging.num_logged_samples, progress.write, resume_after_step)
    unlogged = (resumed or {}).get("step_metrics")
    metrics_file = trackers.jsonl
    if unlogged is not None and metrics_file.continues_file and metrics_file.last_step < start_rollout:
        trackers.log(unlogged, step=start_rollout)  # the run was killed after its save, before its log
    return StepLog(trackers, progress, log, samples)


def _schedule(config: Config, start_rollout: int, num_rollout: int, has_eval_sets: bool) -> Schedule:
    ckpt, algorithm = config.checkpoint, config.algorithm
    return Schedule(start_rollout, num_rollout, trains=not config.debug.debug_rollout_only,
                    has_eval_sets=has_eval_sets, skip_eval_before_train=config.eval.skip_eval_before_train,
                    eval_interval=config.eval.eval_interval, saves=bool(ckpt.save or ckpt.save_hf),
                    save_interval=ckpt.save_interval, update_weights_interval=config.sync.update_weights_interval,
                    ref_update_interval=algorithm.ref_update_interval,
                    num_critic_only_steps=algorithm.num_critic_only_steps,
                    engines_only_evaluate=config.rollout.sft_from_data)


def held_groups(config: Config) -> int:
    """The buffer's memory bound, in groups. The sync loop holds one step's groups at a time (max_staleness more
    steps' worth leaves room to lag). The async loop generates ahead of the trainer: as many steps as the staleness
    bound allows, since groups generated further ahead would be too stale when their turn came."""
    batch = config.rollout.rollout_batch_size or 1
    bound = config.staleness_bound
    return batch * max(bound, 1) if config.sync.async_train else batch * (bound + 1)


def _check_checkpoints(config: Config, run_dir: RunDirPlan, log) -> None:
    """The checkpoint directories, the Megatron architecture flags against config.json, and a resume's settings
    against the checkpoint's: a refused resume must not rewrite the run's config.yaml and commands.jsonl."""
    _check_checkpoint_dir("--hf-checkpoint", config.model.hf_checkpoint)
    if config.model.ref_load:
        _check_checkpoint_dir("--ref-load", config.model.ref_load)
    check_against_checkpoint(config, log)  # no-op flags logged
    if run_dir.checkpoint is not None:
        check_resumable(load_run_state(run_dir.checkpoint), config_to_dict(config),
                        read_model_shape(config.model.hf_checkpoint), config.checkpoint.load)


def _refuse_torch_dist(config: Config) -> None:
    """slime's scripts point --load and --ref-load at Megatron checkpoints; sluice reads HF ones. Said first."""
    for flag, path in (("--load", config.checkpoint.load), ("--ref-load", config.model.ref_load),
                       ("--hf-checkpoint", config.model.hf_checkpoint), ("--critic-load", config.train.critic_load)):
        if path and is_torch_dist_checkpoint(path):
            raise ConfigError(torch_dist_refusal(flag, path))


def _check_checkpoint_dir(flag: str, path: str) -> None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{flag} {path}: not a Hugging Face checkpoint directory (no config.json there)")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno}, column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
        raise ConfigError(f"{flag} {path}: {config_file} is not valid JSON{where}: "
                          f"{getattr(error, 'msg', None) or error}") from None
    if not any(Path(path).glob("*.safetensors")):
        others = sorted(p.name for p in Path(path).glob("*.bin")) or sorted(p.name for p in Path(path).glob("*.pt"))
        found = f"it holds {', '.join(others[:3])}" if others else "it holds no weight files"
        raise ConfigError(f"{flag} {path}: no *.safetensors weights there ({found}); sluice reads safetensors "
                          "checkpoints: AutoModelForCausalLM.from_pretrained(path).save_pretrained(out) writes one")


def _checkpoint_tokenizer(checkpoint: str):
    """The tokenizer of --hf-checkpoint; a file the tokenizer libraries cannot read is named with the flag."""
    try:
        return load_tokenizer(checkpoint)
    except Exception as error:  # noqa: BLE001 - transformers and tokenizers raise bare Exception for bad files
        raise ConfigError(f"--hf-checkpoint {checkpoint}: cannot load its tokenizer: {type(error).__name__}: "
                          f"{error}") from None
