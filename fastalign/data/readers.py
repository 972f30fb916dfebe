"""Readers for text data files (plain or compressed): JSON lines, JSON documents, CSV.

Each yields raw rows `(where, row, error)` with `where` = "path:line" (JSON documents:
"path:line:column", where the row's object starts). A UTF-8 byte-order mark is dropped. Lines
are those of the decompressed text; the path is the file's own (e.g. "pairs.jsonl.gz:12").

- JSON lines are read line by line from the (decompressing) stream: a bad line is a row error
  with the JSON decoder's column, and reading goes on.
- A JSON document (a list of objects, or {"data": [...]}) is parsed whole; a syntax error stops
  the file with a ValueError naming line and column (there is no next row to resume at).
- CSV values are all strings (`TextRow`): CSV has no types, and guessing them turns answers
  such as " 4." into floats. The fields that must be numbers (label, margin, p_chosen) are
  parsed from text by `fastalign.data.formats`. A row with the wrong number of fields is
  `invalid_csv`; an unreadable file (bad UTF-8, a corrupt stream) is a ValueError naming the line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from fastalign.data.compression import STREAM_ERRORS, open_binary
from fastalign.data.errors import RawRow, RowError

BOM = "\ufeff"
_DATA_LAYOUT = re.compile(r'\{\s*"data"\s*:\s*')
_NOT_BLANK = re.compile(r"\S")
_HEAD_BYTES = 1 << 16


class TextRow(dict):
    """A row whose values are all strings because its source has no types (CSV)."""


def _unreadable(path: Path, compression: str | None, line: int, e: Exception) -> ValueError:
    what = f"{compression} stream" if compression else "file"
    return ValueError(f"{path}: could not read the {what} after line {line}: {type(e).__name__}: {e}")


def iter_jsonl(path: Path, compression: str | None) -> Iterator[RawRow]:
    lineno = 0
    with open_binary(path, compression) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                row = _json_line(raw)
                if row is not None:
                    yield (f"{path}:{lineno}", *row)
        except STREAM_ERRORS as e:
            raise _unreadable(path, compression, lineno, e) from e


def _json_line(raw: bytes) -> tuple[object, RowError | None] | None:
    """(row, None), (None, error), or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, RowError("invalid_json", f"not valid UTF-8 at byte column {e.start + 1} ({e.reason})")
    # A BOM starts files written by some Windows tools, and any line of files concatenated from them.
    line = line.removeprefix(BOM)
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, RowError("invalid_json", f"{e.msg} at column {e.colno}")
    if not isinstance(row, dict):
        return None, RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    return row, None


def json_layout(path: Path, compression: str | None) -> str:
    """ "document" for a .json file holding a list or {"data": [...]}, else "lines" (JSON lines)."""
    with open_binary(path, compression) as f:
        try:
            head = f.read(_HEAD_BYTES).decode("utf-8", errors="replace").removeprefix(BOM).lstrip()
        except STREAM_ERRORS as e:
            raise _unreadable(path, compression, 0, e) from e
    return "document" if head.startswith("[") or _DATA_LAYOUT.match(head) else "lines"


def iter_json_document(path: Path, compression: str | None) -> Iterator[RawRow]:
    with open_binary(path, compression) as f:
        try:
            data = f.read()
        except STREAM_ERRORS as e:
            raise _unreadable(path, compression, 0, e) from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    start = _NOT_BLANK.search(text)
    layout = _DATA_LAYOUT.match(text, start.start()) if start else None
    pos = layout.end() if layout else (start.start() if start else 0)
    if pos >= len(text) or text[pos] != "[":
        where = "'data' must be a list" if layout else "expected a list of objects"
        raise _bad_json(path, f'{where} (a .json file holds [...] or {{"data": [...]}})', text, pos)
    end = yield from _walk_array(path, text, pos)
    _check_tail(path, text, end, inside_object=layout is not None)


def _walk_array(path: Path, text: str, pos: int):
    """Yield the rows of the JSON array starting at text[pos] == "["; return the index after "]"."""
    decoder, lines = json.JSONDecoder(), _Lines(text)
    pos = _skip_blank(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _bad_json(path, e.msg, text, e.pos) from None
        where = f"{path}:{lines.at(pos)}"
        if isinstance(row, dict):
            yield where, row, None
        else:
            yield where, None, RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
        pos = _skip_blank(text, end)
        if text.startswith("]", pos):
            return pos + 1
        if not text.startswith(",", pos):
            raise _bad_json(path, "Expecting ',' delimiter", text, pos)
        pos = _skip_blank(text, pos + 1)


def _check_tail(path: Path, text: str, end: int, *, inside_object: bool) -> None:
    """Nothing but blanks may follow the array, or, for {"data": [...]}, the rest of that object."""
    if not inside_object:
        rest = _NOT_BLANK.search(text, end)
        if rest:
            raise _bad_json(path, "Extra data", text, rest.start())
        return
    prefix = '{"data": []'  # re-parse the object's remaining members behind an empty stand-in list
    try:
        json.loads(prefix + text[end:])
    except json.JSONDecodeError as e:
        raise _bad_json(path, e.msg, text, end + e.pos - len(prefix)) from None


class _Lines:
    """ "line:column" of increasing positions in `text`, counting newlines once (big documents)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> str:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        column = pos - self.text.rfind("\n", 0, pos)  # 1-based: rfind is -1 on the first line
        return f"{self.line}:{column}"


def _skip_blank(text: str, pos: int) -> int:
    match = _NOT_BLANK.search(text, pos)
    return match.start() if match else len(text)


def _bad_json(path: Path, msg: str, text: str, pos: int) -> ValueError:
    e = json.JSONDecodeError(msg, text, max(pos, 0))  # computes the line and column of `pos`
    return ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {msg}")


def iter_csv(path: Path, compression: str | None) -> Iterator[RawRow]:
    # Long responses exceed csv's default 128 KiB field limit, which would abort the whole file.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # utf-8-sig drops a BOM; newline="" lets csv see the line ends inside quoted fields.
    with io.TextIOWrapper(open_binary(path, compression), encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        try:
            yield from _csv_rows(path, reader)
        except (csv.Error, UnicodeDecodeError, *STREAM_ERRORS) as e:
            raise _unreadable(path, compression, reader.line_num, e) from e


def _csv_rows(path: Path, reader) -> Iterator[RawRow]:
    header = next((r for r in reader if r), None)
    if header is None:
        return
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}:{reader.line_num}: duplicate CSV column name(s) {duplicates}")
    start = reader.line_num + 1
    for fields in reader:
        where, start = f"{path}:{start}", reader.line_num + 1
        if not fields:
            continue  # a blank line
        if len(fields) != len(header):
            error = RowError("invalid_csv", f"row has {len(fields)} fields, the header has {len(header)}")
            yield where, None, error
        else:
            yield where, TextRow(zip(header, fields, strict=True)), None
