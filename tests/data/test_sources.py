"""Data files as read from disk: compressed streams, byte-order marks, JSON positions, CSV as text."""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import lzma
import random
import sys
import tracemalloc
from pathlib import Path

import pytest
from repo_assets import ASSETS, PANDALM

from fastalign.data import load_examples
from fastalign.data.prompts import load_prompts
from fastalign.data.sources import iter_rows

PAIR = {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " a dog ran."}
BAD = {"prompt": "  ", "chosen": " a", "rejected": " b"}  # empty_field
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lambda data: lzma.compress(data, preset=1)}


def _zstd_compress(data: bytes) -> bytes:
    return pytest.importorskip("zstandard").ZstdCompressor().compress(data)


def compressor(suffix: str):
    return _zstd_compress if suffix == ".zst" else COMPRESS[suffix]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "models" / "stories260k"))


def enc(tok, text, special=False):
    return tok(text, add_special_tokens=special).input_ids


def jsonl_bytes(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


@functools.cache
def text_like() -> bytes:
    """~3 MB of JSON lines that compress about as well as text does (runs of one letter compress
    1000:1, which hides truncation inside bz2's first block and makes zstd's steps big)."""
    rng = random.Random(0)
    return jsonl_bytes([{**PAIR, "chosen": rng.randbytes(1000).hex()} for _ in range(1500)])


CSV_TEXT = 'prompt,chosen,rejected\nOnce upon a time," there was a cat."," a dog ran."\n  , a, b\n'
CONTENTS = {  # suffix -> (file bytes, where the bad row is reported)
    ".jsonl": (jsonl_bytes([PAIR, "", BAD]), ":3"),
    ".json": (json.dumps([PAIR, BAD], indent=1).encode(), ":7:2"),
    ".csv": (CSV_TEXT.encode(), ":3"),
}


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("kind", [".jsonl", ".json", ".csv"])
def test_compressed_files_read_like_plain_ones(tok, tmp_path, kind, compression):
    data, bad_where = CONTENTS[kind]
    plain = tmp_path / f"pairs{kind}"
    plain.write_bytes(data)
    packed = tmp_path / f"pairs{kind}{compression}"
    packed.write_bytes(compressor(compression)(data))
    expected, plain_report = load_examples("preference", plain, tok)
    examples, report = load_examples("preference", packed, tok)
    assert examples == expected and len(examples) == 1
    assert examples[0]["chosen_ids"] == [*enc(tok, PAIR["chosen"]), tok.eos_token_id]
    assert report.skipped == plain_report.skipped == {"empty_field": 1}
    assert report.first_problems == [f"{packed}{bad_where}: empty_field: 'prompt' is empty"]


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz", ".zst"])
def test_jsonl_is_streamed_not_decompressed_whole(tmp_path, compression):
    data = text_like()
    path = tmp_path / f"big.jsonl{compression}"
    path.write_bytes(compressor(compression)(data))
    tracemalloc.start()
    try:
        rows = iter_rows(path)
        next(rows)  # the decompressor's own state (xz: its dictionary) is allocated by now
        first = tracemalloc.get_traced_memory()[1]
        n = 1 + sum(1 for _ in rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # never the whole text at once (xz's 1 MiB dictionary is most of `first`), and no growth per row
    assert n == 1500 and peak < len(data) / 2 and peak - first < len(data) / 8, (first, peak, len(data))


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz", ".zst"])
def test_truncated_or_corrupt_streams_name_the_file_and_line(tmp_path, compression):
    data = text_like()
    packed = compressor(compression)(data)
    path = tmp_path / f"cut.jsonl{compression}"
    path.write_bytes(packed[: len(packed) * 3 // 4])
    rows = iter_rows(path)
    assert next(rows)[0] == f"{path}:1"  # rows stream out before the damage is reached
    with pytest.raises(
        ValueError, match=rf"cut\.jsonl\{compression}: could not read the \w+ stream after line \d+"
    ):
        list(rows)
    fake = tmp_path / f"fake.jsonl{compression}"
    fake.write_bytes(data)  # plain JSON lines under a compressed name
    with pytest.raises(ValueError, match=r"fake\.jsonl.*could not read the \w+ stream after line 0"):
        list(iter_rows(fake))


def test_zstd_without_the_package_names_it(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    with pytest.raises(
        ValueError, match=r"pairs\.jsonl\.zst: .*'zstandard' package \(pip install zstandard\)"
    ):
        list(iter_rows(path))


def test_concatenated_zstd_frames_are_one_file(tmp_path):
    first, second = jsonl_bytes([PAIR]), jsonl_bytes([{**PAIR, "prompt": "Two"}])
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(_zstd_compress(first) + _zstd_compress(second))
    assert [row["prompt"] for _, row, _ in iter_rows(path)] == ["Once upon a time", "Two"]


def test_unsupported_and_local_looking_names(tmp_path):
    for name, match in [
        ("pairs.bz2", r"pairs\.bz2: unsupported data file type; expected one of .*\.gz, \.bz2, \.xz, \.zst"),
        ("pairs.parquet.gz", r"parquet compresses internally"),
        ("pairs.txt.gz", r"unsupported data file type"),
    ]:
        (tmp_path / name).write_bytes(gzip.compress(b"x"))
        with pytest.raises(ValueError, match=match):
            list(iter_rows(tmp_path / name))
    # a compressed name that does not exist is a missing local file, never a hub dataset name
    for name in ("pairs.jsonl.gz", "pairs.zst"):
        with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
            list(iter_rows(name))


def test_byte_order_mark_is_dropped(tok, tmp_path):
    bom = "\ufeff"
    jsonl = tmp_path / "bom.jsonl"  # BOM at the start, and mid-file where two such files were joined
    jsonl.write_text(bom + json.dumps(PAIR) + "\n" + bom + json.dumps({**PAIR, "prompt": "Two"}) + "\n")
    ex, rep = load_examples("preference", jsonl, tok)
    assert rep.rows_read == rep.kept == 2 and not rep.skipped
    assert ex[0]["prompt_ids"] == enc(tok, PAIR["prompt"], special=True)
    csv_path = tmp_path / "bom.csv"
    csv_path.write_text(bom + 'prompt,chosen,rejected\nOnce upon a time," there was a cat."," a dog ran."\n')
    (row,) = [r for _, r, _ in iter_rows(csv_path)]
    assert list(row) == ["prompt", "chosen", "rejected"]  # not "\ufeffprompt"
    doc = tmp_path / "bom.json"
    doc.write_text(bom + json.dumps([PAIR]))
    assert [r for _, r, _ in iter_rows(doc)] == [PAIR]
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert load_examples("preference", gz, tok)[0] == ex


def test_broken_json_lines_report_the_decoders_column(tmp_path):
    lines = [
        '{"prompt": "a", "chosen": "b" "rejected": "c"}',
        '{"prompt": "a", "chosen": "b", "rejected": "c"} extra',
        '   {"prompt": "a",, "chosen": "b"}',
        "\ufeff{broken",
    ]
    path = tmp_path / "broken.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
    errors = [(where, str(err)) for where, _, err in iter_rows(path)]
    assert errors == [
        (f"{path}:1", "invalid_json: Expecting ',' delimiter at column 31"),
        (f"{path}:2", "invalid_json: Extra data at column 49"),
        (f"{path}:3", "invalid_json: Expecting property name enclosed in double quotes at column 19"),
        (f"{path}:4", "invalid_json: Expecting property name enclosed in double quotes at column 2"),
        (f"{path}:5", "invalid_json: not valid UTF-8 at byte column 16 (invalid continuation byte)"),
    ]


def test_json_documents_name_line_and_column(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b"}, [3]\n]\n')
    assert [(w, r, e and e.reason) for w, r, e in iter_rows(path)] == [
        (f"{path}:2:3", {"prompt": "a"}, None),
        (f"{path}:3:3", {"prompt": "b"}, None),
        (f"{path}:3:20", None, "not_an_object"),
    ]
    cases = {
        '[\n {"prompt": "a"},\n {"prompt": "b" "x": 1}\n]': r":3:17: invalid JSON: Expecting ',' delimiter",
        '[{"prompt": "a"} {"prompt": "b"}]': r":1:18: invalid JSON: Expecting ',' delimiter",
        '[{"prompt": "a"}]\n\n  ]': r":3:3: invalid JSON: Extra data",
        '{"data": [{"prompt": "a"}],\n "n" 2}': r":2:6: invalid JSON: Expecting ':' delimiter",
        '{"data": {"prompt": "a"}}': r":1:10: invalid JSON: 'data' must be a list",
    }
    for text, match in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"^{path}{match}"):
            list(iter_rows(path))
    path.write_text('{"data": [{"prompt": "a"}], "version": 2}')  # more members after the list are fine
    assert [r for _, r, _ in iter_rows(path)] == [{"prompt": "a"}]
    path.write_text('{"prompt": "a"}\n{"prompt": \n')  # JSON lines in a .json file: read line by line
    assert [(w, e and e.reason) for w, _, e in iter_rows(path)] == [
        (f"{path}:1", None),
        (f"{path}:2", "invalid_json"),
    ]


def test_csv_values_stay_text_and_numeric_fields_are_parsed(tok, tmp_path):
    path = tmp_path / "math.csv"
    path.write_text(
        "prompt,chosen,rejected,margin,p_chosen\n"
        "What is 2 + 2?, 4., 5.,1.5,\n"
        "What is 3 + 3?, 6, 7,,0.25\n"
        "What is 1 + 1?, 2, 3,big,\n"
        "What is 0 + 0?, 0, 1,,1.5\n"
    )
    ex, rep = load_examples("preference", path, tok)
    assert rep.kept == 2 and rep.skipped == {"wrong_type": 2}
    assert ex[0]["chosen_ids"] == [*enc(tok, " 4."), tok.eos_token_id]  # not the float 4.0
    assert ex[0]["rejected_ids"] == [*enc(tok, " 5."), tok.eos_token_id]
    assert ex[0]["margin"] == 1.5 and "p_chosen" not in ex[0]  # an empty cell is "not given"
    assert ex[1]["p_chosen"] == 0.25 and "margin" not in ex[1]
    assert rep.first_problems == [
        f"{path}:4: wrong_type: 'margin' must be a number, got 'big'",
        f"{path}:5: wrong_type: 'p_chosen' must be a number in [0, 1], got 1.5",
    ]
    kto = tmp_path / "kto.csv"
    kto.write_text(
        "prompt,completion,label\nOnce, upon,True\nOnce, a,0\nOnce, b,false\nOnce, c,1\nOnce, d,yes\n"
    )
    ex, rep = load_examples("kto", kto, tok)
    assert [e["label"] for e in ex] == [True, False, False, True] and rep.skipped == {"bad_label": 1}
    prompts = tmp_path / "answers.csv"
    prompts.write_text("prompt,answer\nWhat is 2 + 2?, 4.\n")
    rows, _ = load_prompts(prompts, tok)
    assert rows[0]["columns"] == {"answer": " 4."}  # reward functions get the text as written


def test_csv_rows_are_named_by_their_first_line(tok, tmp_path):
    path = tmp_path / "multi.csv"
    long = "z" * 200_000  # over csv's default 128 KiB field limit
    path.write_text(
        f'prompt,chosen,rejected\n"Once\nupon", a, b\n\nOnce, a\n  , a, b\n"Tell a long story", "{long}", b\n'
    )
    items = [(w, e and str(e)) for w, _, e in iter_rows(path)]
    assert items == [
        (f"{path}:2", None),
        (f"{path}:5", "invalid_csv: row has 2 fields, the header has 3"),
        (f"{path}:6", None),
        (f"{path}:7", None),
    ]
    _, rep = load_examples("preference", path, tok, max_length=100_000)
    assert rep.kept == 2 and rep.first_problems[1] == f"{path}:6: empty_field: 'prompt' is empty"
    path.write_text("prompt,chosen,prompt\na,b,c\n")
    with pytest.raises(ValueError, match=r"multi\.csv:1: duplicate CSV column name\(s\) \['prompt'\]"):
        list(iter_rows(path))
    path.write_bytes(b"prompt,chosen,rejected\na,b,c\nd,\xff,f\n")
    with pytest.raises(
        ValueError, match=r"multi\.csv: could not read the file after line \d: UnicodeDecodeError"
    ):
        list(iter_rows(path))


def test_parquet_keeps_its_column_types(tok, tmp_path):
    import datasets

    text = tmp_path / "text.parquet"
    datasets.Dataset.from_list([{**PAIR, "chosen": " 4.", "rejected": " 5."}]).to_parquet(str(text))
    ex, _ = load_examples("preference", text, tok)
    assert ex[0]["chosen_ids"] == [*enc(tok, " 4."), tok.eos_token_id]
    floats = tmp_path / "floats.parquet"
    datasets.Dataset.from_list([{**PAIR, "chosen": 4.0, "rejected": 5.0}]).to_parquet(str(floats))
    with pytest.raises(
        ValueError, match=r"'chosen' must be a string, got float 4\.0 \(the source stores this"
    ):
        load_examples("preference", floats, tok, strict=True)


def test_real_file_compressed_matches_plain(tok, tmp_path):
    path = tmp_path / "pandalm.jsonl.xz"
    path.write_bytes(lzma.compress(Path(PANDALM).read_bytes()))
    plain, plain_rep = load_examples("preference", PANDALM, tok, max_rows=40, max_length=2048)
    packed, rep = load_examples("preference", path, tok, max_rows=40, max_length=2048)
    assert packed == plain and rep.kept == plain_rep.kept == 40
