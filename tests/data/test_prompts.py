"""load_prompts: prompt files for the online recipes (chat template rules, truncation, skips, columns)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from repo_assets import ASSETS

from fastalign.data.prompts import column_lists, load_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = ASSETS / "models" / "stories260k"

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL))


@pytest.fixture
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


def _jsonl(tmp_path: Path, rows: list, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_plain_prompts_without_template_are_tokenised_as_text(tok, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "Once upon a time", "answer": "x"}, {"prompt": "The cat sat"}])
    rows, report = load_prompts(path, tok, max_prompt_length=64)
    assert [r["prompt_ids"] for r in rows] == [
        tok("Once upon a time").input_ids,
        tok("The cat sat").input_ids,
    ]
    assert rows[0]["prompt_ids"][0] == tok.bos_token_id
    assert [r["prompt_text"] for r in rows] == ["Once upon a time", "The cat sat"]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[0]["columns"] == {"answer": "x"} and rows[1]["columns"] == {}
    assert column_lists(rows) == {"answer": ["x", None]}
    assert report.kept == 2 and report.rows_read == 2 and not report.skipped


def test_chat_template_on_strings_and_messages(chat_tok, tmp_path):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell a story"}]
    path = _jsonl(tmp_path, [{"prompt": "Tell a story"}, {"prompt": msgs}])
    rows, _ = load_prompts(path, chat_tok, max_prompt_length=128)
    one_turn = chat_tok.apply_chat_template(
        [{"role": "user", "content": "Tell a story"}], tokenize=False, add_generation_prompt=True
    )
    assert one_turn.endswith("<|assistant|>")
    assert rows[0]["prompt_ids"] == chat_tok(one_turn).input_ids
    full = chat_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rows[1]["prompt_ids"] == chat_tok(full).input_ids
    assert rows[1]["prompt_text"] == "Tell a story"  # the last user turn: what reward models see
    # chat_template=False: strings stay plain text; message lists still use the template
    plain, _ = load_prompts(path, chat_tok, max_prompt_length=128, chat_template=False)
    assert plain[0]["prompt_ids"] == chat_tok("Tell a story").input_ids
    assert plain[1]["prompt_ids"] == rows[1]["prompt_ids"]


def test_message_prompts_need_a_template(tok, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="chat template"):
        load_prompts(path, tok)


def test_truncation_keeps_the_end(tok, tmp_path):
    text = " ".join(["the little dog ran to the park"] * 6)
    path = _jsonl(tmp_path, [{"prompt": text}])
    rows, report = load_prompts(path, tok, max_prompt_length=10)
    full = tok(text).input_ids
    assert len(full) > 10
    assert rows[0]["prompt_ids"] == full[-10:]
    assert report.truncated == 1


def test_bad_rows_are_skipped_with_reasons_and_lines(tok, tmp_path):
    path = _jsonl(
        tmp_path,
        [{"prompt": "ok one"}, "{not json", {"question": "no prompt"}, {"prompt": "  "}, {"prompt": 3}, "[1]",
         {"prompt": "ok two"}],
    )  # fmt: skip
    rows, report = load_prompts(path, tok)
    assert [r["prompt_text"] for r in rows] == ["ok one", "ok two"]
    assert report.skipped == {
        "invalid_json": 1, "missing_field": 1, "empty_field": 1, "bad_type": 1, "not_an_object": 1
    }  # fmt: skip
    assert report.first_problems[0].startswith(f"{path}:2: invalid_json")
    assert any(p.startswith(f"{path}:3: missing_field") for p in report.first_problems)
    with pytest.raises(ValueError, match=r"p\.jsonl:2: invalid_json"):
        load_prompts(path, tok, strict=True)


def test_columns_mapping_and_errors(tok, tmp_path):
    path = _jsonl(tmp_path, [{"question": "What is red?", "answer": "apple"}])
    rows, _ = load_prompts(path, tok, columns={"prompt": "question"})
    assert rows[0]["prompt_text"] == "What is red?" and rows[0]["columns"] == {"answer": "apple"}
    with pytest.raises(ValueError, match=r"data\.columns"):
        load_prompts(path, tok, columns={"chosen": "question"})
    with pytest.raises(ValueError, match="no usable prompts"):
        load_prompts(path, tok)  # no "prompt" column in any row
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl", tok)


def test_csv_source(tok, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\nThe sun was hot,yes\nA bird flew,no\n")
    rows, report = load_prompts(path, tok, max_rows=1)
    assert len(rows) == 1 and rows[0]["prompt_text"] == "The sun was hot"
    assert rows[0]["columns"] == {"answer": "yes"} and report.rows_read == 1
