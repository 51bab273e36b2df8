"""Whether a checkpoint may resume under the current config: the fields that make it the same run.

A resume must continue the saved run, not start a different one on top of its state. Refused when changed:
- what the data cursor points into: the prompt file, its keys, the prompt length filter, shuffle and seed
  (the same cursor would name other prompts);
- the batch shape: prompts per rollout, samples per prompt, samples per optimizer step (sample indices,
  optimizer step counts and the LR schedule are counted in these units);
- the algorithm's state: the advantage estimator (a critic exists only with ppo), the loss type and the
  trainer dtype (the optimizer moments are saved in it);
- the model's architecture and shape (the saved tensors would not fit).
Everything else (learning rate, clipping, eval, logging, engine settings, the number of rollouts, paths of
the model, checkpoints and run directory) may change; ``changed_settings`` lists those changes for the log.
"""

from __future__ import annotations

from typing import Any

# Flag keys (config_to_dict spelling) whose change makes the checkpoint another run's.
RESUME_FIELDS: tuple[str, ...] = (
    "prompt_data", "input_key", "label_key", "apply_chat_template", "apply_chat_template_kwargs",
    "rollout_max_prompt_len", "rollout_shuffle", "rollout_seed",
    "rollout_batch_size", "n_samples_per_prompt", "global_batch_size",
    "advantage_estimator", "loss_type", "train_dtype",
)
# Keys of a model's config.json that fix the shapes of its tensors.
MODEL_SHAPE_KEYS: tuple[str, ...] = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings",
)
# Keys that differ between any two runs and say nothing about compatibility.
_ALWAYS_DIFFERENT = ("load", "save", "run_dir", "overwrite_run_dir")


def model_shape(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The shape-defining entries of a model's config.json (as a dict)."""
    return {key: hf_config.get(key) for key in MODEL_SHAPE_KEYS}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _effective(flags: dict[str, Any]) -> dict[str, Any]:
    """Flags with derived defaults filled in, so an explicit value equal to the default is no change."""
    out = dict(flags)
    if out.get("global_batch_size") is None and out.get("rollout_batch_size") is not None:
        out["global_batch_size"] = out["rollout_batch_size"] * out.get("n_samples_per_prompt", 1)
    return out


def resume_mismatches(saved_flags: dict[str, Any], flags: dict[str, Any], saved_shape: dict[str, Any] | None,
                      shape: dict[str, Any] | None) -> list[str]:
    """One line per incompatible difference, each naming the flag (or model field) and both values."""
    saved_flags, flags = _effective(saved_flags), _effective(flags)
    problems = [f"{_flag(key)}: saved {saved_flags.get(key)!r}, now {flags.get(key)!r}"
                for key in RESUME_FIELDS if key in saved_flags and saved_flags.get(key) != flags.get(key)]
    if saved_shape is not None and shape is not None:
        problems += [f"model {key} (--hf-checkpoint): saved {saved_shape.get(key)!r}, now {shape.get(key)!r}"
                     for key in MODEL_SHAPE_KEYS if saved_shape.get(key) != shape.get(key)]
    return problems


def changed_settings(saved_flags: dict[str, Any], flags: dict[str, Any]) -> list[str]:
    """The allowed differences (e.g. ``--lr: 1e-06 -> 2e-06``), for the resume log line."""
    return [f"{_flag(key)}: {saved_flags[key]!r} -> {flags.get(key)!r}"
            for key in sorted(saved_flags)
            if key not in RESUME_FIELDS and key not in _ALWAYS_DIFFERENT and key in flags
            and saved_flags[key] != flags[key]]
