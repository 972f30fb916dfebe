"""Raw rows from a data source, each with a `where` string for error messages.

- `.jsonl` / `.ndjson`: read here, line by line, so a bad line is reported as `path:line` and skipped
  instead of failing the whole file (blank lines are ignored; they are not rows).
- `.json` (a list of objects, or `{"data": [...]}`), `.parquet`, `.csv` and `datasets.save_to_disk`
  folders: read through the `datasets` library; `where` is `path:row N` (1-based).
- anything else that looks like `name` or `owner/name` and is not a local path: a Hugging Face hub
  dataset, `datasets.load_dataset(name, split=split)`. Offline, that fails with a message saying what
  to download and to pass a local path instead.

A local path that does not exist is a FileNotFoundError naming it. `datasets` is imported lazily.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fastalign.files import describe_missing

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATASETS_SUFFIXES = (".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class RowError(Exception):
    """A bad row: `reason` is the counted skip reason, `detail` says what was expected."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# One raw row: (where, row, None) for a parsed row, (where, None, RowError) for an unreadable one.
RawRow = tuple[str, object, RowError | None]


def _looks_local(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith(JSONL_SUFFIXES + DATASETS_SUFFIXES)
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
    name = path.name.lower()
    if path.is_dir():
        return _iter_dataset(_load_from_disk(path, split), str(path))
    if name.endswith(JSONL_SUFFIXES):
        return _iter_jsonl(path)
    if name.endswith(DATASETS_SUFFIXES):
        return _iter_dataset(_load_file(path), str(path))
    raise ValueError(
        f"{path}: unsupported data file type; expected one of "
        f"{', '.join(JSONL_SUFFIXES + DATASETS_SUFFIXES)} or a datasets.save_to_disk folder"
    )


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, RowError("invalid_json", f"line is not valid UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, RowError("invalid_json", f"{e.msg} at column {e.colno}")
                continue
            if not isinstance(row, dict):
                yield (
                    where,
                    None,
                    RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}"),
                )
                continue
            yield where, row, None


def _iter_dataset(ds, name: str) -> Iterator[RawRow]:
    for i, row in enumerate(ds, start=1):
        yield f"{name}:row {i}", row, None


def _load_file(path: Path):
    import datasets

    builder = path.suffix.lower().lstrip(".")
    kwargs = {}
    if builder == "json":
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
        # A top-level object is the {"data": [...]} layout; a list or JSON lines need no field.
        if head.startswith("{") and re.match(r'\{\s*"data"\s*:', head):
            kwargs["field"] = "data"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        hint = ' (a .json file must hold a list of objects or {"data": [...]})' if builder == "json" else ""
        raise ValueError(f"{path}: datasets could not read this {builder} file{hint}: {e}") from e


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
