"""`load_examples`: source -> validated, tokenised, truncated examples plus a `DataReport`.

Bad input never crashes deep inside and never passes silently: each bad row is skipped with a
counted reason (the first five shown as "where: reason: detail"), or, with `strict=True`, the first
one raises ValueError with that same message. Zero kept rows is a ValueError with the summary.
Both are a `FormatUndetectedError` (a ValueError) when no row fitted any format of the kind.
Problems that concern the whole source rather than one row (missing file, unreadable file, no chat
template on a chat row, a bad `columns` mapping) raise at once.

Format detection (`fmt="auto"`): rows are held back until `DETECT_ROWS` of them fit a format of the
kind (or `HOLD_MAX` rows were read); the format most of them fit is the source's (ties: the one
seen first), so one odd first row cannot reject a whole file. The held rows are then processed in
source order like all later ones; a row fitting another format is skipped as `format_mismatch`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fastalign.data.errors import DataWarning, FormatUndetectedError, RawRow, RowError
from fastalign.data.formats import FORMATS, KINDS, check_columns, detect, expected_keys, normalize, rename
from fastalign.data.sources import iter_rows
from fastalign.data.tokenize import Encoder

MAX_PROBLEMS = 5
DETECT_ROWS = 32  # fitting rows that vote on the format
HOLD_MAX = 4096  # rows held back at most while too few fit (bounds memory on a file of bad rows)

# A renamed row with the format its keys fit: (where, row, error, own format or None).
Item = tuple[str, dict | None, RowError | None, str | None]


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
    format_votes: dict[str, int] = field(default_factory=dict)  # format -> fitting rows that chose it
    warnings: list[str] = field(default_factory=list)  # the source loads but may train badly

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
        for warning in self.warnings:
            text += f" Warning: {warning}"
        return text

    def _skip(self, where: str, err: RowError, strict: bool) -> None:
        message = f"{where}: {err.reason}: {err.detail}"
        if strict and self.format is None:  # no held row fitted a format
            raise FormatUndetectedError(message, self)
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
    {input_ids, labels}; each with "index", its position in the list. Raises FormatUndetectedError
    (a ValueError) when no row fits a `kind` format, ValueError when no row is usable otherwise.
    """
    _check_arguments(kind, fmt, max_rows)
    columns = check_columns(columns)
    encode = Encoder(kind, tokenizer, max_length, max_prompt_length)
    report = DataReport(source=str(source), kind=kind, format=None if fmt == "auto" else fmt)
    examples: list[dict] = []
    items = _decided(_renamed(iter_rows(source, split=split, max_rows=max_rows), kind, columns), report)
    for where, row, error, own in items:
        report.rows_read += 1
        try:
            if error is not None:
                raise error
            _check_format(kind, report, row, own, auto=fmt == "auto")
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
        if report.format is None:
            raise FormatUndetectedError(f"no usable rows: {report.summary()}", report)
        raise ValueError(f"no usable rows: {report.summary()}")
    _warn(report, examples)
    return examples, report


def _check_arguments(kind: str, fmt: str, max_rows: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if fmt != "auto" and fmt not in FORMATS[kind]:
        raise ValueError(
            f"fmt {fmt!r} does not fit kind {kind!r}; expected 'auto' or one of {', '.join(FORMATS[kind])}"
        )
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")


def _renamed(rows: Iterable[RawRow], kind: str, columns: dict[str, str]) -> Iterator[Item]:
    for where, raw, error in rows:
        if error is not None:
            yield where, None, error, None
            continue
        try:
            row = rename(raw, columns)
        except RowError as e:
            yield where, None, e, None
            continue
        yield where, row, None, detect(kind, row)


def _decided(items: Iterable[Item], report: DataReport) -> Iterator[Item]:
    """`items` in source order, each once `report.format` is set (or no more rows can decide it)."""
    held: list[Item] = []
    votes: Counter[str] = Counter()
    for item in items:
        if report.format is not None:
            yield item
            continue
        held.append(item)
        if item[3] is not None:
            votes[item[3]] += 1
        if votes.total() >= DETECT_ROWS or len(held) >= HOLD_MAX:
            _decide(report, votes)
            yield from held
            held, votes = [], Counter()
    if report.format is None:
        _decide(report, votes)
    yield from held


def _decide(report: DataReport, votes: Counter[str]) -> None:
    if votes:  # Counter keeps first-seen order, so max() breaks a tie in favour of the earlier format
        report.format = max(votes, key=votes.__getitem__)
        report.format_votes = dict(votes)


def _check_format(kind: str, report: DataReport, row: dict, own: str | None, *, auto: bool) -> None:
    if report.format is None:
        raise RowError(
            "missing_field",
            f"row fits no {kind} format (keys: {', '.join(sorted(map(str, row)))}; expected "
            f"{expected_keys(kind)}; pass columns= to map other names)",
        )
    if auto and own is not None and own != report.format:
        n, total = report.format_votes[report.format], sum(report.format_votes.values())
        raise RowError(
            "format_mismatch",
            f"row is in {own!r} format, the source in {report.format!r} ({n} of its first {total} rows "
            "that fit a format)",
        )


def _warn(report: DataReport, examples: list[dict]) -> None:
    """Warnings about a source that loads but trains badly: in the report and as a DataWarning."""
    if report.kind == "kto":
        labels = {ex["label"] for ex in examples}
        if len(labels) == 1:
            which = "desirable (label true)" if labels.pop() else "undesirable (label false)"
            report.warnings.append(
                f"all {len(examples)} kept KTO rows are {which}: KTO learns from the contrast of "
                "desirable and undesirable completions, with one kind it only moves those completions "
                "against the KL reference point; add rows of the other label."
            )
    for message in report.warnings:
        warnings.warn(f"{report.source}: {message}", DataWarning, stacklevel=3)
