"""What a run saves (--save, --save-hf) and how --load restores it.

A checkpoint holds the trainer (actor, optimizer unless --no-save-optim, LR schedule, reference and critic
where used, the non-finite step counters), the data cursor (the prompt source's or a Data Buffer's
``state_dict``), the RNG streams, the step and weight version, the config (as flags and as config.yaml), the
model's shape, the tracker run ids, and the metrics of the step it was saved after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sluice.checkpoint.hf_export import export_hf, hf_export_path
from sluice.checkpoint.store import (
    capture_rng_state,
    load_checkpoint,
    load_run_state,
    restore_rng_state,
    save_checkpoint,
)
from sluice.buffer.data_buffer import FORMAT as BUFFER_FORMAT
from sluice.config import Config, ConfigError, config_to_dict, save_config
from sluice.orchestration.resume import check_resumable, resume_checkpoint


class RunCheckpoints:
    """Saves and restores one run's state: the trainer pool's (None with --debug-rollout-only) and the data
    source's (the Data Buffer, or any source with ``state_dict``)."""

    def __init__(self, config: Config, tokenizer, model_shape: dict[str, Any], log, trainer, data_source) -> None:
        self.config, self.tokenizer, self.model_shape, self.log = config, tokenizer, model_shape, log
        self.trainer, self.data_source = trainer, data_source

    def save(self, rollout_id: int, trackers_state: dict[str, Any], step_metrics: dict[str, Any] | None = None,
             after_write=None) -> Path | None:
        """The HF export (--save-hf) and the checkpoint (--save) after rollout ``rollout_id``.

        ``trackers_state``: the tracker run ids (observability.step_log.StepLog.state_dict).
        ``step_metrics``: the step's metrics record, kept so that a run killed after the save but before
        logging that step gets the record back on resume. Returns the checkpoint directory (None without
        --save). ``after_write``: see checkpoint.store.AfterWrite.
        """
        ckpt = self.config.checkpoint
        if ckpt.save_hf:
            export_hf(self.trainer.model, self.tokenizer, hf_export_path(ckpt.save_hf, rollout_id))
        if not ckpt.save:
            return None
        state = {
            **_data_states(self.data_source),
            "rng": capture_rng_state(),
            "weight_version": rollout_id + 1,
            "config": config_to_dict(self.config),
            "model_shape": self.model_shape,
            "trackers": trackers_state,
            "with_optimizer": ckpt.save_optim,
            "step_metrics": step_metrics,
        }
        return save_checkpoint(ckpt.save, rollout_id, self.trainer, state, tokenizer=self.tokenizer,
                               write_config=lambda path: save_config(self.config, path),
                               with_optimizer=ckpt.save_optim, keep_last=ckpt.keep_checkpoints,
                               after_write=after_write)

    def resume(self) -> dict[str, Any] | None:
        """Restore the trainer, the data cursor and the RNG streams from --load; returns the checkpoint's run
        state, or None for a fresh start. The caller pushes the restored weights to its engines."""
        ckpt = self.config.checkpoint
        if not ckpt.load:
            return None
        path = resume_checkpoint(ckpt.load, ckpt.save)
        if path is None:
            self.log(f"--load {ckpt.load}: no checkpoint yet; starting a new run")
            return None
        state = load_run_state(path)
        changes = check_resumable(state, config_to_dict(self.config), self.model_shape, ckpt.load)
        try:
            load_checkpoint(path, self.trainer)
        except ValueError as error:  # e.g. a ppo run resuming from a checkpoint without a critic
            raise ConfigError(f"--load {ckpt.load}: {error}") from error
        # "buffer" since the Data Buffer; an older checkpoint's "source" (the cursor alone) still loads into it
        self._restore_data(self.data_source, state.get("buffer", state.get("source")), ckpt.load)
        if "rng" in state:  # the sampling stream continues where the saved run was, not from --seed again
            restore_rng_state(state["rng"])
        self.log(f"resumed from {path} at rollout {state['rollout_id'] + 1}"
                 + (f"; changed settings: {', '.join(changes)}" if changes else ""))
        if self.trainer is not None and not state.get("with_optimizer", True):
            self.log(f"{path} holds no optimizer state (saved with --no-save-optim): AdamW restarts its moments")
        return state

    def _restore_data(self, data_source, saved: dict[str, Any] | None, load: str) -> None:
        if saved is None or not hasattr(data_source, "load_state_dict"):
            self.log(f"--load {load}: the data source has no saved state; it starts from its beginning")
            return
        if saved.get("format") == BUFFER_FORMAT and saved.get("source") is None:
            self.log(f"--load {load}: the data source has no saved state; it starts from its beginning "
                     "(the buffer's requeued and finished groups are restored)")
        try:
            data_source.load_state_dict(saved)
        except ValueError as error:  # the prompt file, shuffle or seed changed since the save
            raise ConfigError(f"--load {load}: {error}") from error


def _data_states(data_source) -> dict[str, Any]:
    """``source``: the prompt cursor (what a checkpoint held before the Data Buffer, and what tools read);
    ``buffer``: the Data Buffer's whole state, cursor included, when ``data_source`` is one."""
    state = data_source.state_dict() if hasattr(data_source, "state_dict") else None
    if state is not None and state.get("format") == BUFFER_FORMAT:
        return {"source": state["source"], "buffer": state}
    return {"source": state}
