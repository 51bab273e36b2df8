"""Megatron's architecture flags (slime's MODEL_ARGS) against the Hugging Face checkpoint's config.json.

sluice builds the model from config.json, so these flags configure nothing; a script whose MODEL_ARGS describe a
different model than --hf-checkpoint is almost certainly wrong, and slime would fail on it too. Each flag given is
compared with the checkpoint's value; switches (--swiglu, --qk-layernorm, ...) are compared as well when a
MODEL_ARGS set is given (--num-layers or --hidden-size), since leaving one out describes a different model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sluice.config.megatron import MegatronConfig
from sluice.config.slime_compat import noop_notes
from sluice.config.sections import Config
from sluice.errors import ConfigError

# Families whose attention normalises queries and keys (Megatron's --qk-layernorm).
_QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
# Families with a bias on the q/k/v projections whatever config.json says (Megatron's --add-qkv-bias).
_QKV_BIAS_FAMILIES = ("qwen2", "qwen2_moe")

# (flag, MegatronConfig field, config.json value from the parsed dict)
_VALUES: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("--num-layers", "num_layers", lambda c: c.get("num_hidden_layers")),
    ("--hidden-size", "hidden_size", lambda c: c.get("hidden_size")),
    ("--ffn-hidden-size", "ffn_hidden_size", lambda c: c.get("intermediate_size")),
    ("--num-attention-heads", "num_attention_heads", lambda c: c.get("num_attention_heads")),
    ("--kv-channels", "kv_channels", lambda c: c.get("head_dim") or _default_head_dim(c)),
    ("--norm-epsilon", "norm_epsilon", lambda c: c.get("rms_norm_eps")),
    ("--rotary-base", "rotary_base", lambda c: _rope_theta(c)),
    ("--num-experts", "num_experts", lambda c: c.get("num_experts") or c.get("n_routed_experts")),
    ("--moe-ffn-hidden-size", "moe_ffn_hidden_size", lambda c: c.get("moe_intermediate_size")),
    ("--moe-router-topk", "moe_router_topk", lambda c: c.get("num_experts_per_tok")),
)


def _default_head_dim(hf: dict[str, Any]) -> int | None:
    heads = hf.get("num_attention_heads")
    return hf["hidden_size"] // heads if heads and hf.get("hidden_size") else None


def _rope_theta(hf: dict[str, Any]) -> float | None:
    # transformers 5 moves rope_theta into rope_parameters; older config.json files have it at the top level.
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta", params.get("rope_theta"))


def _padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def _same(given: Any, expected: Any) -> bool:
    if isinstance(given, float) or isinstance(expected, float):
        return abs(float(given) - float(expected)) <= 1e-9 * max(1.0, abs(float(expected)))
    return given == expected


def architecture_mismatches(mega: MegatronConfig, hf: dict[str, Any]) -> Iterator[str]:
    """Each architecture flag given that disagrees with ``hf`` (a parsed config.json), naming both values."""
    for flag, name, read in _VALUES:
        given, expected = getattr(mega, name), read(hf)
        if given is not None and expected is not None and not _same(given, expected):
            yield f"{flag} {given}, but the checkpoint has {expected}"
    yield from _query_groups(mega, hf)
    yield from _vocab(mega, hf)
    if mega.gives_architecture:
        yield from _switches(mega, hf)


def _query_groups(mega: MegatronConfig, hf: dict[str, Any]) -> Iterator[str]:
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv_heads is None or heads is None:
        return
    if mega.num_query_groups is not None and mega.num_query_groups != kv_heads:
        yield f"--num-query-groups {mega.num_query_groups}, but the checkpoint has {kv_heads} key/value heads"
    elif mega.gives_architecture and kv_heads != heads and not mega.group_query_attention:
        yield (f"the checkpoint uses grouped-query attention ({kv_heads} key/value heads for {heads} query heads): "
               f"add --group-query-attention --num-query-groups {kv_heads}")


def _vocab(mega: MegatronConfig, hf: dict[str, Any]) -> Iterator[str]:
    expected = hf.get("vocab_size")
    if mega.vocab_size is None or expected is None:
        return
    multiple = mega.make_vocab_size_divisible_by
    if _padded(mega.vocab_size, multiple) != _padded(expected, multiple):
        yield (f"--vocab-size {mega.vocab_size}, but the checkpoint has {expected} (compared after padding both to "
               f"a multiple of --make-vocab-size-divisible-by {multiple})")


def _switches(mega: MegatronConfig, hf: dict[str, Any]) -> Iterator[str]:
    family = hf.get("model_type", "")
    checks = (
        ("--swiglu", mega.swiglu, hf.get("hidden_act", "silu") == "silu", "a SwiGLU MLP (hidden_act silu)"),
        ("--qk-layernorm", mega.qk_layernorm, family in _QK_NORM_FAMILIES, "query/key RMSNorm"),
        ("--untie-embeddings-and-output-weights", mega.untie_embeddings_and_output_weights,
         not hf.get("tie_word_embeddings", True), "an output layer separate from the embedding"),
        ("--disable-bias-linear", mega.disable_bias_linear,
         not hf.get("attention_bias", False) and not hf.get("mlp_bias", False), "no bias in its linear layers"),
        ("--add-qkv-bias", mega.add_qkv_bias, family in _QKV_BIAS_FAMILIES or bool(hf.get("attention_bias")),
         "a bias on the query/key/value projections"),
    )
    for flag, given, has, what in checks:
        if given and not has:
            yield f"{flag} is given, but the checkpoint ({family}) does not have {what}: drop it"
        elif has and not given:
            yield f"the checkpoint ({family}) has {what}: add {flag}"
    if mega.normalization == "LayerNorm" and "rms_norm_eps" in hf:
        yield "--normalization LayerNorm, but the checkpoint uses RMSNorm: use --normalization RMSNorm"


def check_against_checkpoint(config: Config, log=print) -> None:
    """Raises ConfigError naming every architecture flag that disagrees with --hf-checkpoint's config.json;
    logs the accepted no-op flags once. Call before any weights load."""
    for note in noop_notes(config):
        log(note)
    checkpoint = config.model.hf_checkpoint
    path = Path(checkpoint) / "config.json" if checkpoint else None
    if path is None or not path.is_file():
        return  # the builder's checkpoint check reports a missing checkpoint
    problems = list(architecture_mismatches(config.megatron, json.loads(path.read_text())))
    if problems:
        raise ConfigError(f"the Megatron architecture flags do not match --hf-checkpoint {checkpoint}:\n  "
                          + "\n  ".join(problems))
