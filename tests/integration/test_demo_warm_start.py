"""The demo's warm start is a run of SFT from data (--rollout-function-path sft), not a trainer loop of its own."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from sluice.data import load_prompt_samples
from sluice.demo.model import build_checkpoint
from sluice.demo.run import build_task_files
from sluice.demo.warm_start import WarmStart, warm_start
from sluice.models.tokenizer import load_tokenizer
from sluice.observability.metrics import read_metrics


def test_the_demo_warm_start_trains_the_teacher_answers_through_the_sft_rollout(tmp_path, small_shape):
    base = build_checkpoint(tmp_path / "base", shape=small_shape, seed=0)
    files = build_task_files(tmp_path / "data", num_train=12, num_eval=4, seed=0, teacher_error_rate=0.5)
    settings = WarmStart(base, files["teacher"], tmp_path / "sft_model", tmp_path / "sft", num_steps=2,
                         batch_size=8, micro_batch_size=8, lr=1e-2, seed=0)
    config = settings.config()
    assert config.rollout.sft_from_data and config.data.response_key == "label"

    tokenizer = load_tokenizer(base)  # what each trained sample is: prompt, the teacher's answer, <|im_end|>
    samples, _ = load_prompt_samples(str(files["teacher"]), config.data, tokenizer)
    rows = [json.loads(line) for line in files["teacher"].read_text().splitlines()]
    for sample, row in zip(samples, rows):
        answer = tokenizer.encode(row["label"], add_special_tokens=False) + [tokenizer.eos_token_id]
        assert sample.tokens == sample.prompt_tokens + answer and sample.loss_mask == [1] * len(answer)

    lines = []
    out = warm_start(settings, log=lines.append)
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 2 and any(line.startswith("  sft step 2/2: loss") for line in lines)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not before[name].equal(after[name]) for name in before)  # trained, and exported
    assert load_tokenizer(out).encode("12+34=\n") == tokenizer.encode("12+34=\n")
