"""Raw rows from a data source, each with a `where` string for error messages.

- `.jsonl` / `.ndjson`: read line by line (streaming), so a bad line is reported as `path:line` and
  skipped instead of failing the whole file (blank lines are ignored; they are not rows).
- `.json`: a list of objects or `{"data": [...]}` (rows named `path:line:column`), or JSON lines.
- `.csv`: every value a string (`readers.TextRow`), rows named `path:line`.
- each of these compressed: `.gz`, `.bz2`, `.xz`, `.zst` after the suffix (`pairs.jsonl.gz`),
  decompressed while read (fastalign.data.compression); lines are those of the decompressed text.
- `.parquet` and `datasets.save_to_disk` folders: read through the `datasets` library; `where` is
  `path:row N` (1-based).
- anything else that looks like `name` or `owner/name` and is not a local path: a Hugging Face hub
  dataset, `datasets.load_dataset(name, split=split)`. Offline, that fails with a message saying what
  to download and to pass a local path instead.

A local path that does not exist is a FileNotFoundError naming it. `datasets` is imported lazily.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from fastalign.data import readers
from fastalign.data.compression import COMPRESSIONS, split_compression
from fastalign.data.errors import RawRow, RowError
from fastalign.files import describe_missing

__all__ = ["RawRow", "RowError", "iter_rows"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".csv")  # read here, plain or compressed
LOCAL_SUFFIXES = (*TEXT_SUFFIXES, ".parquet", *COMPRESSIONS)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.lower().endswith(LOCAL_SUFFIXES)
        or not _HUB_NAME.match(source)
    )


def iter_rows(
    source: str | os.PathLike, *, split: str = "train", max_rows: int | None = None
) -> Iterator[RawRow]:
    """Yield the raw rows of `source` (at most `max_rows`, bad ones included in the count)."""
    path = Path(source).expanduser()
    if path.exists():
        rows = _iter_local(path, split)
    elif isinstance(source, os.PathLike) or _looks_local(str(source)):
        raise FileNotFoundError(f"data source not found: {describe_missing(source)} (no such file or folder)")
    else:
        rows = _iter_dataset(_load_hub(str(source), split), str(source))
    for n, row in enumerate(rows):
        if max_rows is not None and n >= max_rows:
            return
        yield row


def _iter_local(path: Path, split: str) -> Iterator[RawRow]:
    if path.is_dir():
        return _iter_dataset(_load_from_disk(path, split), str(path))
    base, compression = split_compression(path.name.lower())
    if base.endswith(JSONL_SUFFIXES):
        return readers.iter_jsonl(path, compression)
    if base.endswith(".json"):
        if readers.json_layout(path, compression) == "document":
            return readers.iter_json_document(path, compression)
        return readers.iter_jsonl(path, compression)
    if base.endswith(".csv"):
        return readers.iter_csv(path, compression)
    if base.endswith(".parquet") and compression is None:
        return _iter_dataset(_load_parquet(path), str(path))
    hint = " (parquet compresses internally: store it uncompressed)" if base.endswith(".parquet") else ""
    raise ValueError(
        f"{path}: unsupported data file type{hint}; expected one of {', '.join(TEXT_SUFFIXES)} (each "
        f"also compressed: {', '.join(COMPRESSIONS)}), .parquet, or a datasets.save_to_disk folder"
    )


def _iter_dataset(ds, name: str) -> Iterator[RawRow]:
    for i, row in enumerate(ds, start=1):
        yield f"{name}:row {i}", row, None


def _load_parquet(path: Path):
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:
        raise ValueError(f"{path}: datasets could not read this parquet file: {e}") from e


def _load_from_disk(path: Path, split: str):
    import datasets

    if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ValueError(
            f"{path}: a folder source must be written by datasets' save_to_disk "
            "(no dataset_info.json, state.json or dataset_dict.json in it)"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{path}: datasets.load_from_disk failed: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: split {split!r} not in the saved DatasetDict (has {sorted(ds)})")
        ds = ds[split]
    return ds


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "no network?"
        raise ValueError(
            f"could not load hub dataset {name!r} (split {split!r}; {why}): {type(e).__name__}: {e}. "
            f"On a machine with network, download it, e.g. `datasets.load_dataset({name!r}, split={split!r})"
            ".save_to_disk(DIR)` or the dataset's .jsonl/.parquet files, and pass that local path as the "
            "source."
        ) from e
