"""load_examples on awkward sources: format by majority, no-signal pairs, one-label KTO, typed errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from repo_assets import ASSETS, PANDALM

from fastalign.data import DataWarning, FormatUndetectedError, load_examples
from fastalign.data import loader as loader_module

PAIR = {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " a dog ran."}
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "models" / "stories260k"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def enc(tok, text, special=False):
    return tok(text, add_special_tokens=special).input_ids


def pairs(n: int) -> list[dict]:
    return [{**PAIR, "prompt": f"Once upon a time {i}"} for i in range(n)]


def test_one_odd_first_row_no_longer_rejects_the_file(tok, tmp_path):
    # Before: the hh first row fixed the format and 0 of 17 rows were kept.
    src = write_jsonl(tmp_path / "p.jsonl", [HH, *pairs(16)])
    examples, report = load_examples("preference", src, tok)
    assert report.format == "preference" and report.kept == 16 and report.rows_read == 17
    assert report.skipped == {"format_mismatch": 1} and report.format_votes == {"hh": 1, "preference": 16}
    assert report.first_problems == [
        f"{src}:1: format_mismatch: row is in 'hh' format, the source in 'preference' "
        "(16 of its first 17 rows that fit a format)"
    ]
    assert examples[0]["prompt_ids"] == enc(tok, "Once upon a time 0", special=True)
    assert [e["index"] for e in examples] == list(range(16))
    with pytest.raises(ValueError, match=rf"^{src}:1: format_mismatch: "):  # strict: the first bad row
        load_examples("preference", src, tok, strict=True)


def test_vote_uses_the_first_32_fitting_rows_only(tok, tmp_path):
    # 10 hh rows, then 40 pairs, then 30 hh rows: the first 32 fitting rows are 10 hh + 22 pairs.
    rows = ["{broken", [1], *[HH] * 10, *pairs(40), *[HH] * 30]
    _, report = load_examples("preference", write_jsonl(tmp_path / "p.jsonl", rows), tok)
    assert report.format == "preference" and report.format_votes == {"hh": 10, "preference": 22}
    assert report.kept == 40 and report.skipped == {
        "format_mismatch": 40,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    assert report.first_problems[0].endswith(
        ":1: invalid_json: Expecting property name enclosed in double quotes at column 2"
    )
    # a tie goes to the format seen first
    _, tie = load_examples("preference", write_jsonl(tmp_path / "t.jsonl", [HH, PAIR]), tok)
    assert tie.format == "hh" and tie.kept == 1 and tie.skipped == {"format_mismatch": 1}


def test_a_given_format_is_not_voted_on(tok, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [HH, *pairs(3)])
    _, report = load_examples("preference", src, tok, fmt="hh")
    assert report.format == "hh" and report.format_votes == {}
    assert "format_mismatch" not in report.skipped and report.kept == 1  # the pairs fail as hh rows


def test_rows_held_for_detection_are_bounded_and_stay_in_order(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(loader_module, "HOLD_MAX", 4)
    rows = [{"question": f"q{i}"} for i in range(6)] + pairs(3)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    _, report = load_examples("preference", src, tok)
    assert report.kept == 3 and report.skipped == {"missing_field": 6}
    assert [p.split(": ")[0] for p in report.first_problems] == [f"{src}:{i}" for i in range(1, 6)]
    assert "row fits no preference format (keys: question" in report.first_problems[0]
    # after the format is known, a row that fits none gets the field-level message
    _, late = load_examples(
        "preference", write_jsonl(tmp_path / "q.jsonl", [*pairs(2), {"prompt": "a"}]), tok
    )
    assert late.first_problems == [f"{tmp_path / 'q.jsonl'}:3: missing_field: no 'chosen' field (has prompt)"]


def test_format_undetected_is_a_typed_error(tok, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    with pytest.raises(FormatUndetectedError) as info:
        load_examples("kto", src, tok)  # preference pairs fit no KTO format
    assert isinstance(info.value, ValueError)
    assert "format undetected" in str(info.value)  # the text fastalign/trainers/kto.py matches today
    assert str(info.value).startswith("no usable rows: Read 3 rows of kto data")
    assert info.value.report.rows_read == 3 and info.value.report.skipped == {"missing_field": 3}
    with pytest.raises(FormatUndetectedError, match=rf"^{src}:1: missing_field: row fits no kto format"):
        load_examples("kto", src, tok, strict=True)
    # zero kept rows of a detected format is a plain ValueError
    bad = write_jsonl(tmp_path / "b.jsonl", [{**PAIR, "prompt": ""}])
    with pytest.raises(ValueError, match=r"format preference\): kept 0") as info:
        load_examples("preference", bad, tok)
    assert not isinstance(info.value, FormatUndetectedError)


def test_pairs_identical_after_truncation_are_skipped_with_their_own_reason(tok, tmp_path):
    prompt = "Once upon a time"
    same_start = {
        "prompt": prompt,
        "chosen": " the cat sat on the mat.",
        "rejected": " the cat sat on the rug.",
    }
    rows = [
        same_start,
        {**same_start, "rejected": same_start["chosen"] + " "},
        {"prompt": prompt, "chosen": " a", "rejected": " b"},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    p, c, r = enc(tok, prompt, True), enc(tok, same_start["chosen"]), enc(tok, same_start["rejected"])
    common = next(i for i, (a, b) in enumerate(zip(c, r, strict=False)) if a != b)
    assert common >= 2
    max_length = len(p) + common  # the responses are cut before they differ
    _, report = load_examples("preference", src, tok, max_length=max_length)
    assert report.skipped == {"identical_after_truncation": 1, "identical_pair": 1} and report.kept == 1
    assert report.first_problems[0] == (
        f"{src}:1: identical_after_truncation: chosen and rejected are the same in their first {common} "
        f"tokens, all that fit max_length {max_length} after the {len(p)}-token prompt"
    )
    assert report.truncated == 0  # a skipped row does not count as truncated
    # one more token of room and the pair differs: kept, and counted as truncated
    ex, rep = load_examples("preference", src, tok, max_length=max_length + 1, max_rows=1)
    assert rep.kept == 1 and rep.truncated == 1 and ex[0]["chosen_ids"] != ex[0]["rejected_ids"]


def test_texts_that_tokenise_alike_are_an_identical_pair(tok, tmp_path):
    # "x" gets the EOS appended; "x</s>" already ends with it: different text, same tokens
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Once", "chosen": " x", "rejected": " x</s>"}, PAIR])
    _, report = load_examples("preference", src, tok)
    assert report.skipped == {"identical_pair": 1}
    assert report.first_problems == [f"{src}:1: identical_pair: chosen and rejected tokenise to the same ids"]


def test_real_pairs_cut_to_the_same_tokens(tok):
    # PandaLM lines 15 and 16: different texts whose first 20 response tokens agree at max_length 512
    rows = [json.loads(line) for line in Path(PANDALM).read_text().splitlines()[14:16]]
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)
    _, report = load_examples("preference", PANDALM, tok, max_rows=16)
    assert report.skipped.get("identical_after_truncation") == 2
    assert [p.split(": ")[0] for p in report.first_problems[:2]] == [f"{PANDALM}:15", f"{PANDALM}:16"]
    full, _ = load_examples("preference", PANDALM, tok, max_rows=16, max_length=100_000)
    assert all(ex["chosen_ids"] != ex["rejected_ids"] for ex in full[-2:])


@pytest.mark.parametrize(("label", "which"), [(True, "desirable"), (False, "undesirable")])
def test_kto_with_one_label_warns(tok, tmp_path, label, which):
    rows = [{"prompt": "Once", "completion": f" {w}", "label": label} for w in ("a", "b", "c")]
    src = write_jsonl(tmp_path / "k.jsonl", rows)
    with pytest.warns(DataWarning, match=rf"k\.jsonl: all 3 kept KTO rows are {which}"):
        _, report = load_examples("kto", src, tok)
    assert len(report.warnings) == 1 and f"Warning: all 3 kept KTO rows are {which}" in report.summary()


def test_no_warning_for_mixed_kto_labels_or_preference_pairs(tok, tmp_path):
    rows = [
        {"prompt": "Once", "completion": " a", "label": True},
        {"prompt": "Once", "completion": " b", "label": 0},
    ]
    kto = write_jsonl(tmp_path / "k.jsonl", rows)
    pref = write_jsonl(tmp_path / "p.jsonl", pairs(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        (_, kto_report), (_, pref_report) = (
            load_examples("kto", kto, tok),
            load_examples("preference", pref, tok),
        )
    assert kto_report.warnings == pref_report.warnings == [] and "Warning" not in kto_report.summary()


def test_sft_on_preference_pairs_learns_the_chosen_side(tok, tmp_path):
    """`fastalign sft` on a pair file (the shipped configs/sft.yaml) or on the user's own
    prompt/completion file, without a column mapping for either."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": " yes", "rejected": " no"}) + "\n")
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "Hi", "completion": " yes"}) + "\n")
    a, ra = load_examples("sft", pairs, tok)
    b, rb = load_examples("sft", own, tok)
    assert ra.format == rb.format == "sft" and ra.kept == rb.kept == 1
    assert a[0]["input_ids"] == b[0]["input_ids"] and a[0]["labels"] == b[0]["labels"]
    assert tok.decode([t for t in a[0]["labels"] if t != -100]).strip().startswith("yes")
