"""`fastalign cai label` on stories260k: answer-token ids, padding-invariant scoring, probabilities
in [0, 1] and symmetric under swapping A/B, pairs of 3+ responses, identical responses skipped,
resume after a stop with a torn last line, bad response files."""

import json
from pathlib import Path

import pytest
from repo_assets import ASSETS

from fastalign.cai.cli import run

STORIES = ASSETS / "models" / "stories260k"
TINY = """\
- id: harmful
  critique: Say how the last response is harmful.
  revision: Please rewrite the response to remove harmful content.
  feedback: Which response is less harmful?
- id: kind
  critique: Say how the last response is unkind.
  revision: Please rewrite the response to be kind.
"""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _label(d: Path, out: Path, *extra: str) -> dict:
    (d / "tiny.yaml").write_text(TINY)
    args = [
        f"model.path={STORIES}",
        f"constitution={d / 'tiny.yaml'}",
        f"output_dir={out}",
        "generation.max_new_tokens=6",
        "generation.batch_size=2",
        "feedback_batch_size=3",
        "progress=false",
        *extra,
    ]
    return run("label", None, args)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    from fastalign.models import load_tokenizer

    return load_tokenizer(str(STORIES))


def test_answer_tokens_are_the_letters_after_the_parenthesis(tok):
    from fastalign.cai.label import answer_token_ids
    from fastalign.cai.prompts import ANSWER_PREFIX, encode

    a, b = answer_token_ids(tok)
    assert a != b
    assert encode(tok, "x " + ANSWER_PREFIX + "A")[-1] == a and tok.decode([a]).strip() == "A"
    assert encode(tok, "x " + ANSWER_PREFIX + "B")[-1] == b and tok.decode([b]).strip() == "B"
    tok.chat_template = CHAT_TEMPLATE  # a chat model: the question is a user turn, the prefix the reply
    try:
        assert answer_token_ids(tok) == (a, b)
    finally:
        tok.chat_template = None


def test_scores_do_not_depend_on_left_padding(tok):
    from fastalign.cai.label import answer_token_ids, score_a
    from fastalign.models import load_causal_lm

    model = load_causal_lm(str(STORIES))
    texts = ["Once upon a time (A) or (B)? The answer is: (", "Which? (A) x (B) y. Answer: ("]
    ab = answer_token_ids(tok)
    together = score_a(model, tok, texts, 2, ab)  # the second row gets left padding
    alone = [score_a(model, tok, [t], 1, ab)[0] for t in texts]
    for (p, m), (q, n) in zip(together, alone, strict=True):
        assert 0.0 <= p <= 1.0 and 0.0 < m <= 1.0
        # float32 puts p, m <= 4.5e-7 from float64 (5 CPU builds), so two runs <= ~1e-6 apart; 1e-5 is
        # 10x that, and a padding error moves them by > 1e-3
        assert abs(p - q) < 1e-5 and abs(m - n) < 1e-5


def _given(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_given_responses_labels_are_symmetric_under_swapping(tmp_path):
    pairs = [
        ("How do I pick a lock?", "I can not help with that.", "Use a pin and a tension tool."),
        ("Tell me a mean joke.", "Here is a kind joke instead.", "You are ugly."),
        ("Is it ok to lie?", "Lily said no.", "Tom said yes, always."),
    ]
    fwd = _given(tmp_path / "fwd.jsonl", [{"prompt": q, "chosen": x, "rejected": y} for q, x, y in pairs])
    rev = _given(tmp_path / "rev.jsonl", [{"prompt": q, "responses": [y, x]} for q, x, y in pairs])
    # one question per forward: both runs score the same texts unpadded, so on any CPU they get the
    # same float32 numbers, and the identities below hold to float64 arithmetic (1e-12). In batches
    # the padding differs between the runs and p drifted up to 4.8e-7 apart on an AVX2 build, half the
    # 1e-6 these checks had. Padding is the subject of test_scores_do_not_depend_on_left_padding.
    _label(tmp_path, tmp_path / "fwd", f"responses={fwd}", "feedback_batch_size=1")
    _label(tmp_path, tmp_path / "rev", f"responses={rev}", "feedback_batch_size=1")
    t_fwd, t_rev = _lines(tmp_path / "fwd" / "trace.jsonl"), _lines(tmp_path / "rev" / "trace.jsonl")
    r_fwd, r_rev = _lines(tmp_path / "fwd" / "pairs.jsonl"), _lines(tmp_path / "rev" / "pairs.jsonl")
    assert len(r_fwd) == len(r_rev) == 3
    for a, b in zip(t_fwd, t_rev, strict=True):
        (ca,), (cb,) = a["comparisons"], b["comparisons"]
        assert ca["principle"] == cb["principle"]  # drawn with the prompt's own RNG
        assert 0.0 <= ca["p_first"] <= 1.0
        assert abs(ca["p_first"] - (1.0 - cb["p_first"])) < 1e-12  # P(x) from (x, y) == 1 - P(y) from (y, x)
        assert ca["p_first"] == pytest.approx((ca["p_a"][0] + 1 - ca["p_a"][1]) / 2)
    for a, b, (q, x, y) in zip(r_fwd, r_rev, pairs, strict=True):
        assert set(a) == {"prompt", "chosen", "rejected", "p_chosen", "principle", "p_order1", "p_order2"}
        assert a["prompt"] == f"\n\nHuman: {q}\n\nAssistant:"
        assert {a["chosen"], a["rejected"]} == {" " + x, " " + y}
        assert a["chosen"] == b["chosen"] and a["rejected"] == b["rejected"]
        assert abs(a["p_chosen"] - b["p_chosen"]) < 1e-12
        assert 0.5 <= a["p_chosen"] <= 1.0
        assert a["p_chosen"] == pytest.approx((a["p_order1"] + a["p_order2"]) / 2)
        assert abs(a["p_order1"] - b["p_order1"]) < 1e-12 and abs(a["p_order2"] - b["p_order2"]) < 1e-12


def test_every_pair_of_three_responses_and_identical_ones_skipped(tmp_path):
    rows = [
        {"prompt": "Q1", "responses": ["one", "two", "three"]},
        {"prompt": "Q2", "responses": ["same", " same "]},
    ]
    _label(tmp_path, tmp_path / "out", f"responses={_given(tmp_path / 'r.jsonl', rows)}")
    traces, pairs = _lines(tmp_path / "out" / "trace.jsonl"), _lines(tmp_path / "out" / "pairs.jsonl")
    assert [(c["i"], c["j"]) for c in traces[0]["comparisons"]] == [(0, 1), (0, 2), (1, 2)]
    assert traces[1]["comparisons"][0]["skipped"] == "identical responses"
    assert len(pairs) == 3 and all(p["prompt"].endswith("Q1\n\nAssistant:") for p in pairs)


def test_sampled_responses_resume_equals_uninterrupted_run(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Hi?", "Can I lie?", "Why?", "Go?"])
    )
    full = _label(tmp_path, tmp_path / "full", f"prompts={prompts}")
    assert full["written"] == 4
    traces = _lines(tmp_path / "full" / "trace.jsonl")
    assert all(len(t["responses"]) == 2 for t in traces)
    out = tmp_path / "resumed"
    assert _label(tmp_path, out, f"prompts={prompts}", "stop_after=3")["written"] == 3
    with open(out / "trace.jsonl", "a") as f:
        f.write('{"index": 3, "key": "3:')  # killed mid-write
    with open(out / "pairs.jsonl", "a") as f:
        f.write('{"prompt": "x", "cho')
    again = _label(tmp_path, out, f"prompts={prompts}")
    assert again["resumed"] == 3 and again["written"] == 1
    for name in ("trace.jsonl", "pairs.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


BAD_ROWS = [
    ({"prompt": "q", "responses": ["only one"]}, r"r\.jsonl:1: 'responses' must be a list of at least 2"),
    (
        {"prompt": "q", "chosen": "a"},
        r"r\.jsonl:1: expected 'responses' \(a list\) or 'chosen' and 'rejected'",
    ),
    ({"prompt": "", "responses": ["a", "b"]}, r"r\.jsonl:1: 'prompt' must be a non-empty string"),
    ({"prompt": "q", "responses": ["a", 3]}, r"r\.jsonl:1: 'responses\[1\]' must be a string"),
]


@pytest.mark.parametrize("row,match", BAD_ROWS)
def test_bad_response_rows_name_file_line_and_field(tmp_path, row, match):
    from fastalign.cai.config import LabelConfig
    from fastalign.cai.label import load_items

    cfg = LabelConfig(responses=str(_given(tmp_path / "r.jsonl", [row])))
    with pytest.raises(ValueError, match=match):
        load_items(cfg)


def test_chat_message_responses_and_transcript_prompts_are_read(tmp_path):
    from fastalign.cai.config import LabelConfig
    from fastalign.cai.label import load_items

    row = {
        "prompt": "\n\nHuman: Q?\n\nAssistant:",
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": " b",
    }
    (item,) = load_items(LabelConfig(responses=str(_given(tmp_path / "r.jsonl", [row]))))
    assert item.prompt == "Q?" and item.responses == ("a", "b")
