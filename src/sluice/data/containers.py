"""What a ``--prompt-data`` path names, as an ordered list of shards.

- a file: ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.parquet``, ``.arrow``;
- a directory of shards of one kind (``train-00000-of-00004.parquet`` ...), in name order, or a glob of them
  (``data/train-*.parquet``);
- a directory written by ``datasets``' ``Dataset.save_to_disk`` (``state.json`` lists its Arrow files in order).
  It is read with pyarrow directly: the ``datasets`` library is not needed. A ``DatasetDict`` directory names
  its splits; pass one (``path/train``).

The rows of a container are the rows of its shards one after another, so a row's position (what slices,
shuffles and the resume cursor count) is its index in that concatenation.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from sluice.data.rows import DataError
from sluice.data.jsonl_shard import JsonlShard
from sluice.data.shards import ArrowShard, ParquetShard, Shard

KINDS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")  # file kinds, by how the name ends


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for kind in KINDS if name.endswith(kind)), None)


def shard_of(path: Path) -> Shard:
    kind = kind_of(path)
    if kind == ".parquet":
        return ParquetShard(path)
    if kind == ".arrow":
        return ArrowShard(path)
    if kind in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        return JsonlShard(path, {".jsonl": None, ".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}[kind])
    raise DataError(f"{path}: unknown extension {path.suffix or '(none)'!r}; supported: {', '.join(KINDS)}, "
                    "a directory of such files, or a datasets save_to_disk directory")


def shards_of(path: Path) -> list[Shard]:
    """The shards ``path`` names, in row order; raises ``DataError`` when it names none."""
    if any(char in str(path) for char in "*?"):
        return _one_kind(path, sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file()))
    if path.is_dir():
        return _directory(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    return [shard_of(path)]


def _directory(path: Path) -> list[Shard]:
    if (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits", [])
        raise DataError(f"{path}: a datasets DatasetDict with splits {splits}; pass one split's directory, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file():
        files = _json(path / "state.json").get("_data_files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            raise DataError(f"{path / 'state.json'}: no '_data_files' list; not a datasets save_to_disk directory")
        return [ArrowShard(path / f["filename"]) for f in files]
    return _one_kind(path, sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))


def _one_kind(where: Path, files: list[Path]) -> list[Shard]:
    """The data files among ``files``; one kind only, so a stray copy in another format is not read twice."""
    data = [f for f in files if kind_of(f) is not None]
    if not data:
        found = sorted(f.name for f in files)[:10]
        raise DataError(f"{where}: no data files ({', '.join(KINDS)}); found: {found or 'nothing'}")
    kinds = sorted({kind_of(f) for f in data})
    if len(kinds) > 1:
        raise DataError(f"{where}: data files of several kinds {kinds}; keep one kind, or name one with a glob "
                        f"such as {where / ('*' + kinds[0])}")
    return [shard_of(f) for f in data]


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return value if isinstance(value, dict) else {}
