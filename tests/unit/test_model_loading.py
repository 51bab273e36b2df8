"""HF-named weights into the engine's fused model: every name, shape and tie handled, bad updates refused whole."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.architectures import build_arch_checkpoint
from sluice.models.loading import hf_named_tensors, load_hf_weights, load_model


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama3"])
def test_hf_names_cover_the_reference_state_dict(tmp_path, name):
    path = build_arch_checkpoint(tmp_path, name)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = load_model(path, torch.device("cpu"), torch.float32)
    ours = hf_named_tensors(model)
    theirs = {key: value for key, value in reference.state_dict().items() if not key.endswith("inv_freq")}
    if reference.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


def test_a_tied_model_takes_lm_head_into_the_embedding(tmp_path):
    model = load_model(build_arch_checkpoint(tmp_path, "qwen2"), torch.device("cpu"), torch.float32)
    assert model.lm_head is None
    new_head = torch.randn_like(model.embed_tokens.weight)
    assert load_hf_weights(model, {"lm_head.weight": new_head}) == {"lm_head.weight"}
    assert torch.equal(model.embed_tokens.weight, new_head)


def test_unknown_name_or_wrong_shape_changes_nothing(tmp_path):
    model = load_model(build_arch_checkpoint(tmp_path, "qwen3"), torch.device("cpu"), torch.float32)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    q = hf_named_tensors(model)["model.layers.0.self_attn.q_proj.weight"]
    good = {"model.layers.0.self_attn.q_proj.weight": torch.zeros_like(q)}
    with pytest.raises(KeyError, match="model.layers.7.mlp.up_proj.weight"):
        load_hf_weights(model, {**good, "model.layers.7.mlp.up_proj.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"k_proj.weight.*\(5, 64\)"):
        load_hf_weights(model, {**good, "model.layers.0.self_attn.k_proj.weight": torch.zeros(5, 64)})
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fused_views_write_their_own_rows(tmp_path):
    model = load_model(build_arch_checkpoint(tmp_path, "llama3"), torch.device("cpu"), torch.float32)
    names = hf_named_tensors(model)
    ones = torch.ones_like(names["model.layers.1.self_attn.v_proj.bias"])
    load_hf_weights(model, {"model.layers.1.self_attn.v_proj.bias": ones})
    attention = model.layers[1].self_attn
    fused = attention.qkv_proj.bias
    assert torch.equal(fused[attention.q_size + attention.kv_size:], ones)
    assert not torch.equal(fused[: attention.q_size], torch.ones(attention.q_size))
