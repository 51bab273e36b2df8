"""Prompt rows written in every container ``--prompt-data`` reads, and verl's parquet layout.

``write_container(kind, rows, root)`` returns the spec to read; sharded kinds split the rows into uneven shards
(so slices cross shard boundaries at odd places). ``save_to_disk`` writes the layout of ``datasets``'
``Dataset.save_to_disk`` (Arrow IPC stream shards listed in ``state.json``) without the library.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SIZES = (3, 1, 4, 2)  # rows per shard of the sharded kinds; the rest go to a last shard
KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow_file", "arrow_stream", "parquet_shards",
         "jsonl_shards", "jsonl_zst_shards", "parquet_glob", "save_to_disk")


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _shards(rows: list[dict]) -> list[list[dict]]:
    out, start = [], 0
    for size in SHARD_SIZES:
        out.append(rows[start:start + size])
        start += size
    return out + ([rows[start:]] if rows[start:] else [])


def _write_one(path: Path, rows: list[dict]) -> None:
    name = path.name
    if name.endswith(".jsonl"):
        path.write_text(jsonl_text(rows))
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(jsonl_text(rows))
    elif name.endswith(".jsonl.zst"):
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(jsonl_text(rows).encode())
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups per file
    else:
        raise ValueError(f"no writer for {name}")


def _write_arrow(path: Path, rows: list[dict], stream: bool) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)


def save_to_disk(root: Path, rows: list[dict]) -> Path:
    """The directory ``datasets.Dataset.save_to_disk`` writes: stream-format shards, state.json, dataset_info.json."""
    root.mkdir(parents=True)
    shards = _shards(rows)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, part in zip(names, shards):
        _write_arrow(root / name, part, stream=True)
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "0", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (root / "state.json").write_text(json.dumps(state))
    (root / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return root


def write_container(kind: str, rows: list[dict], root: Path) -> str:
    """``rows`` written as ``kind`` under ``root``; the spec that reads them back."""
    root.mkdir(parents=True, exist_ok=True)
    if kind in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet"):
        _write_one(root / f"prompts.{kind}", rows)
        return str(root / f"prompts.{kind}")
    if kind in ("arrow_file", "arrow_stream"):
        _write_arrow(root / "prompts.arrow", rows, stream=kind == "arrow_stream")
        return str(root / "prompts.arrow")
    if kind == "save_to_disk":
        return str(save_to_disk(root / "saved", rows))
    suffix = {"parquet_shards": "parquet", "parquet_glob": "parquet", "jsonl_shards": "jsonl",
              "jsonl_zst_shards": "jsonl.zst"}[kind]
    shards = _shards(rows)
    directory = root / "shards"
    directory.mkdir()
    for i, part in enumerate(shards):
        _write_one(directory / f"train-{i:05d}-of-{len(shards):05d}.{suffix}", part)
    (directory / "README.md").write_text("not data: ignored")
    return str(directory / "train-*.parquet") if kind == "parquet_glob" else str(directory)


def verl_rows(num_rows: int, sources: tuple[str, ...]) -> list[dict]:
    """Rows in verl's layout (its GSM8K preprocessing): chat-message prompt, answer at reward_model.ground_truth."""
    return [{
        "data_source": sources[i % len(sources)],
        "prompt": [{"role": "user", "content": f"{'abcdefghijklmnopqrstuvwxyz'[i % 26]}: say 7"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "7"},
        "extra_info": {"split": "train", "index": i, "answer": "7", "question": "say 7"},
    } for i in range(num_rows)]
