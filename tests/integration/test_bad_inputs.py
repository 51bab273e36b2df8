"""A corpus of malformed inputs, each fed to the real `sluice train`: every one must exit 2 with one paragraph
naming the file (and its line, row or key), no Python traceback, and before any model loads.

The checkpoint here has its config and tokenizer but only one of its weights, so a case that got as far as loading
a model would fail with a missing-weights error instead (the control case shows that it would).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from helpers.tokenizers import printable_ascii_tokenizer
from sluice.cli import main

GOOD_ROWS = [{"input": f"say {i}", "label": str(i)} for i in range(3)]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def good_then(line: str) -> str:
    """Three good rows, then ``line`` as line 4: the bad row is not the first (which is checked earliest)."""
    return jsonl(GOOD_ROWS) + line + "\n"


def parquet_bytes(rows: list[dict], path: Path) -> bytes:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


def truncated_gzip() -> bytes:
    whole = gzip.compress(jsonl(GOOD_ROWS * 50).encode())
    return whole[: len(whole) // 2]


# name -> (file name, content (text or bytes, or a function of a scratch path), fragments the error must contain)
DATA_CASES = {
    "non_utf8": ("latin1.jsonl", jsonl(GOOD_ROWS).encode() + '{"input": "café"}\n'.encode("latin-1"),
                 [":4: not valid UTF-8: byte 0xe9"]),
    "truncated_line": ("cut.jsonl", jsonl(GOOD_ROWS) + '{"input": "say 9", "lab', [":4: invalid JSON"]),
    "array_line": ("array.jsonl", good_then('["say 9", "9"]'), [":4: each line must be a JSON object, got list"]),
    "null_line": ("null.jsonl", good_then("null"), [":4: each line must be a JSON object"]),
    "nan": ("nan.jsonl", good_then('{"input": "x", "label": NaN}'), [":4: invalid JSON: NaN is not a JSON value"]),
    "duplicate_key": ("dup.jsonl", good_then('{"input": "x", "input": "y", "label": "1"}'),
                      [":4: invalid JSON: key 'input' appears twice"]),
    "missing_key": ("missing.jsonl", good_then('{"prompt": "say 9", "label": "9"}'),
                    [":4: missing key 'input' (set by --input-key)"]),
    "prompt_not_text": ("number.jsonl", good_then('{"input": 9, "label": "9"}'),
                        [":4: 'input' must be a string or a list of chat messages, got int"]),
    "bad_message": ("messages.jsonl", good_then('{"input": [{"role": "user"}], "label": "1"}'),
                    [":4: 'input'[0] needs a string 'content'"]),
    "object_label": ("label.jsonl", good_then('{"input": "x", "label": {"a": 1}}'),
                     [":4: label 'label' (--label-key) is a JSON object"]),
    "null_label": ("nolabel.jsonl", good_then('{"input": "x", "label": null}'),
                   [":4: label 'label' (--label-key) is null"]),
    "metadata_not_object": ("meta.jsonl", good_then('{"input": "x", "label": "1", "metadata": [1]}'),
                            [":4: 'metadata' (--metadata-key) must be an object, got list"]),
    "empty_file": ("empty.jsonl", "", [": file has no rows"]),
    "parquet_wrong_types": ("ints.parquet",
                            lambda scratch: parquet_bytes([{"input": i, "label": str(i)} for i in range(3)], scratch),
                            [" row 1: 'input' must be a string or a list of chat messages, got int"]),
    "not_parquet": ("fake.parquet", jsonl(GOOD_ROWS), [": cannot read as parquet"]),
    "truncated_parquet": ("cut.parquet", lambda scratch: parquet_bytes(GOOD_ROWS * 20, scratch)[:300],
                          [": cannot read as parquet"]),
    "not_gzip": ("plain.jsonl.gz", jsonl(GOOD_ROWS), [": cannot read as gzip jsonl: Not a gzipped file"]),
    "truncated_gzip": ("cut.jsonl.gz", truncated_gzip(), [": cannot read as gzip jsonl"]),
    "not_zstd": ("plain.jsonl.zst", jsonl(GOOD_ROWS), [": cannot read as zstd jsonl"]),
    "not_arrow": ("fake.arrow", jsonl(GOOD_ROWS), [": cannot read as Arrow IPC"]),
    "empty_prompt": ("blank.jsonl", good_then('{"input": "", "label": "1"}'), [":4: the prompt is empty (no tokens)"]),
    "prompt_too_long": ("long.jsonl", good_then(json.dumps({"input": "x" * 300, "label": "0"})),
                        [":4: the prompt is 300 tokens, over the 254 a prompt may take"]),
    "lost_character": ("minus.jsonl", good_then(json.dumps({"input": "3 − 2", "label": "1"})),
                       [":4: the tokenizer cannot represent '−' (U+2212 MINUS SIGN)"]),
}

CONFIG_CASES = {
    "yaml_typo_key": ("typo.yaml", "rollout-batchsize: 2\n", [": unknown key 'rollout-batchsize'; did you mean "
                                                              "'rollout-batch-size'?"]),
    "yaml_wrong_type": ("wrong.yaml", "n-samples-per-prompt: two\n",
                        [": key 'n-samples-per-prompt' (--n-samples-per-prompt): expected an integer, got 'two'"]),
    "yaml_not_mapping": ("list.yaml", "- a\n- b\n", [": expected a mapping of flag names to values, got list"]),
    "yaml_not_utf8": ("latin1.yaml", "rollout-batch-size: 2  # café\n".encode("latin-1"),
                      [": not valid UTF-8: byte 0xe9"]),
}

# name -> (what to do to a copy of the checkpoint, the error after "--hf-checkpoint <dir>: ")
CHECKPOINT_CASES = {
    "config_json_not_json": (lambda d: (d / "config.json").write_text("{nope"),
                             "{dir}/config.json is not valid JSON (line 1, column 2)"),
    "tokenizer_config_not_json": (lambda d: (d / "tokenizer_config.json").write_text("{nope"),
                                  "cannot load its tokenizer: ValueError: {dir}/tokenizer_config.json: not valid JSON"),
    "tokenizer_json_not_json": (lambda d: (d / "tokenizer.json").write_text("{nope"),
                                "cannot load its tokenizer: JSONDecodeError: Expecting property name"),
    "no_weights": (lambda d: [p.unlink() for p in d.glob("*.safetensors")],
                   "no *.safetensors weights there (it holds no weight files)"),
    "bin_weights": (lambda d: [p.rename(d / "pytorch_model.bin") for p in d.glob("*.safetensors")],
                    "no *.safetensors weights there (it holds pytorch_model.bin); sluice reads safetensors"),
    # transformers would load the model type's tokenizer class with an empty vocabulary: every prompt -> []
    "no_tokenizer_files": (lambda d: [(d / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
                           "cannot load its tokenizer: ValueError: {dir}: the tokenizer loaded from here encodes "
                           "'Hello world 123' to no tokens"),
}


@pytest.fixture(scope="module")
def weightless_checkpoint(tiny_checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint's config with one weight of many (loading a model from it fails), and a character
    tokenizer that drops what it cannot represent (the demo's own is byte-level and loses nothing)."""
    out = tmp_path_factory.mktemp("weightless")
    shutil.copy(Path(tiny_checkpoint) / "config.json", out / "config.json")
    printable_ascii_tokenizer().save_pretrained(out)
    (weights,) = Path(tiny_checkpoint).glob("*.safetensors")
    save_file({"model.norm.weight": load_file(str(weights))["model.norm.weight"]}, str(out / "model.safetensors"))
    return str(out)


def train_argv(checkpoint: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--hf-checkpoint", checkpoint, "--prompt-data", str(data), "--label-key", "label",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "2",
            "--num-rollout", "1", "--rm-type", "exact", "--train-device", "cpu", "--sglang-device", "cpu",
            "--run-dir", str(run_dir), "--no-progress-bar", *extra]


def write_case(directory: Path, file_name: str, content) -> Path:
    path = directory / file_name
    if callable(content):
        content = content(directory / f"scratch-{file_name}")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def assert_one_clear_error(rc: int, out: str, err: str, path: Path, fragments: list[str]) -> None:
    assert rc == 2, err
    assert "Traceback" not in out + err
    message = err.strip()
    assert message.startswith(f"sluice train: error: {path}") and "\n\n" not in message, message
    for fragment in fragments:  # each follows the file's own name: the line, row or key comes right after it
        assert f"{path}{fragment}" in message, message


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_prompt_data_fails_before_models_load(name, weightless_checkpoint, tmp_path, capsys):
    file_name, content, fragments = DATA_CASES[name]
    path = write_case(tmp_path, file_name, content)
    rc = main(train_argv(weightless_checkpoint, path, tmp_path / "run"))
    captured = capsys.readouterr()
    assert_one_clear_error(rc, captured.out, captured.err, path, fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_eval_data_is_reported_the_same_way(name, weightless_checkpoint, tmp_path, capsys):
    file_name, content, fragments = DATA_CASES[name]
    path = write_case(tmp_path, file_name, content)
    good = write_case(tmp_path, "good.jsonl", jsonl(GOOD_ROWS))
    rc = main(train_argv(weightless_checkpoint, good, tmp_path / "run", "--eval-prompt-data", "held_out", str(path)))
    captured = capsys.readouterr()
    assert_one_clear_error(rc, captured.out, captured.err, path, fragments)


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_file_names_the_file_and_key(name, weightless_checkpoint, tmp_path, capsys):
    file_name, content, fragments = CONFIG_CASES[name]
    path = write_case(tmp_path, file_name, content)
    good = write_case(tmp_path, "good.jsonl", jsonl(GOOD_ROWS))
    rc = main(train_argv(weightless_checkpoint, good, tmp_path / "run", "--config", str(path)))
    captured = capsys.readouterr()
    assert_one_clear_error(rc, captured.out, captured.err, path, fragments)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_broken_checkpoint_files_name_the_checkpoint(name, weightless_checkpoint, tmp_path, capsys):
    break_it, expected = CHECKPOINT_CASES[name]
    broken = tmp_path / "checkpoint"
    shutil.copytree(weightless_checkpoint, broken)
    break_it(broken)
    good = write_case(tmp_path, "good.jsonl", jsonl(GOOD_ROWS))
    rc = main(train_argv(str(broken), good, tmp_path / "run"))
    captured = capsys.readouterr()
    assert rc == 2 and "Traceback" not in captured.out + captured.err
    message = captured.err.strip()
    assert message.startswith(f"sluice train: error: --hf-checkpoint {broken}: {expected.format(dir=broken)}"), message
    assert "\n" not in message


def test_good_data_on_the_weightless_checkpoint_reaches_model_loading(weightless_checkpoint, tmp_path):
    """The control: with nothing wrong in the inputs, the run gets as far as loading weights."""
    good = write_case(tmp_path, "good.jsonl", jsonl(GOOD_ROWS))
    with pytest.raises(ValueError, match=r"the checkpoint lacks \d+ weights"):
        main(train_argv(weightless_checkpoint, good, tmp_path / "run"))


def test_the_installed_command_exits_2_without_a_traceback(weightless_checkpoint, tmp_path):
    """The same through a real process, as a user runs it."""
    file_name, content, fragments = DATA_CASES["prompt_too_long"]
    path = write_case(tmp_path, file_name, content)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", "import sys; from sluice.cli import main; sys.exit(main())",
                           *train_argv(weightless_checkpoint, path, tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_clear_error(proc.returncode, proc.stdout, proc.stderr, path, fragments)
