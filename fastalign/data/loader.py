"""`load_examples`: source -> validated, tokenised, truncated examples plus a `DataReport`.

Bad input never crashes deep inside and never passes silently: each bad row is skipped with a
counted reason (the first five shown as "where: reason: detail"), or, with `strict=True`, the first
one raises ValueError with that same message. Zero kept rows is a ValueError with the summary.
Problems that concern the whole source rather than one row (missing file, unreadable file, no chat
template on a chat row, a bad `columns` mapping) raise at once.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from fastalign.data.formats import FORMATS, KINDS, check_columns, detect, expected_keys, normalize, rename
from fastalign.data.sources import RowError, iter_rows
from fastalign.data.tokenize import Encoder

MAX_PROBLEMS = 5


@dataclass
class DataReport:
    """What happened to the rows of one source."""

    source: str = ""
    kind: str = ""
    format: str | None = None  # detected (or given) row format
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0  # kept rows with a prompt or response cut
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    first_problems: list[str] = field(default_factory=list)  # "where: reason: detail", at most 5

    def summary(self) -> str:
        n_skipped = sum(self.skipped.values())
        text = (
            f"Read {self.rows_read} rows of {self.kind} data from {self.source} "
            f"(format {self.format or 'undetected'}): kept {self.kept}, truncated {self.truncated}, "
            f"skipped {n_skipped}"
        )
        if n_skipped:
            reasons = ", ".join(
                f"{r}: {c}" for r, c in sorted(self.skipped.items(), key=lambda x: (-x[1], x[0]))
            )
            text += f" ({reasons})"
        text += "."
        if self.first_problems:
            text += f" First problems: {'; '.join(self.first_problems)}."
        return text

    def _skip(self, where: str, err: RowError, strict: bool) -> None:
        message = f"{where}: {err.reason}: {err.detail}"
        if strict:
            raise ValueError(message)
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        if len(self.first_problems) < MAX_PROBLEMS:
            self.first_problems.append(message)


def load_examples(
    kind: str,
    source: str | os.PathLike,
    tokenizer,
    *,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    strict: bool = False,
    max_rows: int | None = None,
    split: str = "train",
) -> tuple[list[dict], DataReport]:
    """Load `source` as `kind` ("preference" | "kto" | "sft") examples for the trainers.

    Returns (examples, report). Examples are plain dicts of int lists (see fastalign.data): preference
    {prompt_ids, chosen_ids, rejected_ids[, margin]}, kto {prompt_ids, completion_ids, label}, sft
    {input_ids, labels}; each with "index", its position in the list.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if fmt != "auto" and fmt not in FORMATS[kind]:
        raise ValueError(
            f"fmt {fmt!r} does not fit kind {kind!r}; expected 'auto' or one of {', '.join(FORMATS[kind])}"
        )
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
    columns = check_columns(columns)
    encode = Encoder(kind, tokenizer, max_length, max_prompt_length)
    report = DataReport(source=str(source), kind=kind, format=None if fmt == "auto" else fmt)
    examples: list[dict] = []
    for where, raw, error in iter_rows(source, split=split, max_rows=max_rows):
        report.rows_read += 1
        try:
            if error is not None:
                raise error
            row = rename(raw, columns)
            if report.format is None:
                report.format = detect(kind, row)
                if report.format is None:
                    raise RowError(
                        "missing_field",
                        f"row fits no {kind} format (keys: {', '.join(sorted(map(str, row)))}; expected "
                        f"{expected_keys(kind)}; pass columns= to map other names)",
                    )
            example, truncated = encode(normalize(kind, report.format, row))
        except RowError as e:
            report._skip(where, e, strict)
            continue
        example["index"] = len(examples)
        examples.append(example)
        report.truncated += int(truncated)
    report.kept = len(examples)
    report.skipped = dict(Counter(report.skipped).most_common())
    if not examples:
        raise ValueError(f"no usable rows: {report.summary()}")
    return examples, report
