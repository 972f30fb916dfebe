"""load_examples: sources, format detection, tokenisation, truncation and every skip reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from repo_assets import ASSETS

from fastalign.data import DataReport, DataWarning, load_examples

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = ASSETS / "models" / "stories260k"
PREFS = ASSETS / "data" / "preferences"

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
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def enc(tok, text, special=False):
    return tok(text, add_special_tokens=special).input_ids


PAIR = {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " a dog ran."}


@pytest.mark.parametrize("name", ["pandalm_testset_v1", "oasst_en_100_tree_pairs"])
def test_real_preference_files(tok, name):
    path = PREFS / f"{name}.jsonl"
    rows = [json.loads(line) for line in open(path) if line.strip()]
    examples, report = load_examples("preference", str(path), tok, max_length=100_000)
    assert report.format == "preference" and report.skipped == {} and report.truncated == 0
    assert report.rows_read == report.kept == len(examples) == len(rows)
    for i in (0, len(rows) - 1):
        ex, row = examples[i], rows[i]
        assert ex["index"] == i
        assert ex["prompt_ids"] == enc(tok, row["prompt"], special=True)
        assert ex["chosen_ids"] == [*enc(tok, row["chosen"]), tok.eos_token_id]
        assert ex["rejected_ids"] == [*enc(tok, row["rejected"]), tok.eos_token_id]
    # Default max_length 512: the long prompts of the tiny tokenizer are skipped, counted, and named,
    # and so are pairs the cut leaves identical (PandaLM lines 15-16; test_data_edges checks them).
    _, short = load_examples("preference", str(path), tok, max_rows=60)
    assert short.rows_read == 60 and short.kept + sum(short.skipped.values()) == 60
    assert set(short.skipped) <= {"prompt_too_long", "identical_after_truncation"}


def test_preference_tokens_and_margin(tok, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{**PAIR, "margin": 2}, {**PAIR, "margin": 0.5, "extra": 1}])
    examples, report = load_examples("preference", str(src), tok)
    assert report.kept == 2 and report.format == "preference"
    ex = examples[1]
    assert ex == {
        "prompt_ids": enc(tok, PAIR["prompt"], special=True),
        "chosen_ids": [*enc(tok, PAIR["chosen"]), 2],
        "rejected_ids": [*enc(tok, PAIR["rejected"]), 2],
        "margin": 0.5,
        "index": 1,
    }
    assert ex["prompt_ids"][0] == tok.bos_token_id and examples[0]["margin"] == 2.0


def test_hh_transcripts(tok, tmp_path):
    pre = "\n\nHuman: Tell me a story.\n\nAssistant: Which one?\n\nHuman: About a cat.\n\nAssistant:"
    rows = [
        {"chosen": pre + " The cat sat.", "rejected": pre + " No."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Yo\n\nAssistant: Hey"},
    ]
    examples, report = load_examples("preference", str(write_jsonl(tmp_path / "hh.jsonl", rows)), tok)
    assert report.format == "hh" and report.kept == 1 and report.skipped == {"no_common_prompt": 1}
    assert examples[0]["prompt_ids"] == enc(tok, pre, special=True)
    assert examples[0]["chosen_ids"] == [*enc(tok, " The cat sat."), 2]
    assert examples[0]["rejected_ids"] == [*enc(tok, " No."), 2]
    assert ":2: no_common_prompt:" in report.first_problems[0]


def test_chat_preference(chat_tok, tmp_path):
    user = [{"role": "user", "content": "Tell a story"}]
    good, bad = [{"role": "assistant", "content": "Once upon"}], [{"role": "assistant", "content": "No"}]
    rows = [
        {"prompt": user, "chosen": good, "rejected": bad},
        {"prompt": "Tell a story", "chosen": good, "rejected": bad},  # string prompt = one user turn
        {"chosen": user + good, "rejected": user + bad},  # common leading turns are the prompt
        # UltraFeedback-binarized: a string prompt that both sides repeat as their first turn
        {"prompt": "Tell a story", "chosen": user + good, "rejected": user + bad, "score_chosen": 8.0},
        {"prompt": user, "chosen": user + good, "rejected": user + bad},
    ]
    examples, report = load_examples("preference", str(write_jsonl(tmp_path / "c.jsonl", rows)), chat_tok)
    assert report.format == "chat" and report.kept == 5
    prompt_text = "<|user|>Tell a story</s>\n<|assistant|>"
    for ex in examples:
        assert ex["prompt_ids"] == enc(chat_tok, prompt_text, special=True)
        # the template's "</s>\n" ends in EOS: the newline after it is dropped, no second EOS
        assert ex["chosen_ids"] == enc(chat_tok, "Once upon</s>") and ex["chosen_ids"][-1] == 2
        assert ex["rejected_ids"] == enc(chat_tok, "No</s>")


def test_chat_row_without_template_is_an_error(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(ValueError, match=r"chat template.*model\.chat_template"):
        load_examples("sft", str(write_jsonl(tmp_path / "m.jsonl", rows)), tok)


def test_model_chat_template_supplies_one(tmp_path, monkeypatch):
    from fastalign.models import load_tokenizer

    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    data = str(write_jsonl(tmp_path / "m.jsonl", rows))
    chatml = load_tokenizer(str(MODEL), chat_template="chatml")
    (ex,), _ = load_examples("sft", data, chatml)
    text = chatml.decode(ex["input_ids"])
    assert text.startswith("<s> <|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"), text
    learnt = [t for t, y in zip(ex["input_ids"], ex["labels"], strict=True) if y != -100]
    assert chatml.decode(learnt) == "b<|im_end|>\n</s>"  # the reply, its end marker, then EOS
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer(str(MODEL), chat_template="t.jinja").chat_template == CHAT_TEMPLATE  # relative
    assert load_tokenizer(str(MODEL), chat_template=CHAT_TEMPLATE).chat_template == CHAT_TEMPLATE
    with pytest.raises(FileNotFoundError, match=r"missing\.jinja \(relative to the current directory"):
        load_tokenizer(str(MODEL), chat_template="missing.jinja")
    with pytest.raises(ValueError, match="expected one of \\['chatml'\\]"):
        load_tokenizer(str(MODEL), chat_template="llama9")


def test_kto_rows(tok, chat_tok, tmp_path):
    rows = [
        {"prompt": "Once", "completion": " upon", "label": True},
        {"prompt": "Once", "completion": " a", "label": 0},
        {"prompt": "Once", "completion": " b", "label": "yes"},
        {"prompt": "Once", "completion": " b", "label": 2},
    ]
    examples, report = load_examples("kto", str(write_jsonl(tmp_path / "k.jsonl", rows)), tok)
    assert report.format == "kto" and report.skipped == {"bad_label": 2}
    assert [ex["label"] for ex in examples] == [True, False]
    assert examples[0]["completion_ids"] == [*enc(tok, " upon"), 2] and examples[0]["prompt_ids"][0] == 1
    chat = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Yo"}],
            "label": 1,
        }
    ]
    with pytest.warns(DataWarning, match="all 1 kept KTO rows are desirable"):  # one label only
        ex, rep = load_examples("kto", str(write_jsonl(tmp_path / "kc.jsonl", chat)), chat_tok)
    assert (
        rep.format == "chat" and ex[0]["completion_ids"] == enc(chat_tok, "Yo</s>") and ex[0]["label"] is True
    )


def test_sft_three_shapes(tok, chat_tok, tmp_path):
    ex, rep = load_examples(
        "sft", str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Once", "completion": " upon"}])), tok
    )
    p, c = enc(tok, "Once", special=True), [*enc(tok, " upon"), 2]
    assert rep.format == "sft" and ex[0]["input_ids"] == p + c and ex[0]["labels"] == [-100] * len(p) + c
    ex, rep = load_examples("sft", str(write_jsonl(tmp_path / "b.jsonl", [{"text": "The cat sat."}])), tok)
    ids = [*enc(tok, "The cat sat.", special=True), 2]
    assert rep.format == "sft" and ex[0]["input_ids"] == ids and ex[0]["labels"] == ids
    msgs = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Story?"},
        {"role": "assistant", "content": "Once upon"},
    ]
    rows = [{"messages": msgs}, {"messages": msgs[:4]}]
    ex, rep = load_examples("sft", str(write_jsonl(tmp_path / "c.jsonl", rows)), chat_tok)
    assert rep.format == "chat" and rep.skipped == {"bad_messages": 1}
    prompt = enc(
        chat_tok, chat_tok.apply_chat_template(msgs[:4], tokenize=False, add_generation_prompt=True), True
    )
    comp = enc(chat_tok, "Once upon</s>")
    assert ex[0]["input_ids"] == prompt + comp and ex[0]["labels"] == [-100] * len(prompt) + comp
    # ShareGPT: {"conversations": [{"from", "value"}]} gives the same example
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    share = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs]}]
    sg, rep = load_examples("sft", str(write_jsonl(tmp_path / "d.jsonl", share)), chat_tok)
    assert rep.format == "chat"
    assert sg[0]["input_ids"] == ex[0]["input_ids"] and sg[0]["labels"] == ex[0]["labels"]


def test_every_skip_reason_and_strict(tok, tmp_path):
    good = dict(PAIR)
    lines = [
        good,
        "{not json",
        "[1, 2]",
        {"prompt": "a", "chosen": "b"},
        {**good, "prompt": "   "},
        {**good, "chosen": 5},
        {**good, "rejected": PAIR["chosen"] + "  "},
        {**good, "prompt": "word " * 200},
        {**good, "margin": "big"},
        "",
        good,
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    examples, report = load_examples("preference", str(src), tok, max_length=64)
    assert isinstance(report, DataReport) and report.rows_read == 10 and report.kept == 2
    assert [e["index"] for e in examples] == [0, 1]
    assert report.skipped == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "empty_field": 1,
        "wrong_type": 2,
        "identical_pair": 1,
        "prompt_too_long": 1,
    }
    assert len(report.first_problems) == 5
    assert report.first_problems[0].startswith(f"{src}:2: invalid_json: ")
    assert report.first_problems[2] == f"{src}:4: missing_field: no 'rejected' field (has chosen, prompt)"
    summary = report.summary()
    assert "Read 10 rows" in summary and "kept 2" in summary and "skipped 8" in summary
    assert "wrong_type: 2" in summary and f"{src}:2: invalid_json" in summary and "\n" not in summary
    with pytest.raises(ValueError, match=rf"^{src}:2: invalid_json: "):
        load_examples("preference", str(src), tok, max_length=64, strict=True)


def test_chat_skip_reasons(chat_tok, tmp_path):
    u, a = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}
    rows = [
        {"chosen": [u, a], "rejected": [{"role": "user", "content": "Hey"}, a]},
        {"chosen": [u, {"role": "assistant"}], "rejected": [u, a]},
        {"chosen": [u, a], "rejected": [u, a]},
        {"chosen": [u, a], "rejected": [u, {"role": "assistant", "content": "Sup"}]},
    ]
    _, report = load_examples("preference", str(write_jsonl(tmp_path / "c.jsonl", rows)), chat_tok)
    assert (
        report.skipped == {"no_common_prompt": 1, "bad_messages": 1, "identical_pair": 1} and report.kept == 1
    )


def test_zero_kept_is_an_error_with_summary(tok, tmp_path):
    src = write_jsonl(tmp_path / "z.jsonl", [{"question": "a", "good": "b"}])
    with pytest.raises(ValueError, match=r"no usable rows: Read 1 rows .*missing_field: 1.*pass columns="):
        load_examples("preference", str(src), tok)


def test_columns_mapping(tok, tmp_path):
    rows = [{"question": "Once", "good": " a", "bad": " b", "score": 1.5, "prompt": "ignored"}]
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "score"}
    ex, rep = load_examples("preference", str(src), tok, columns=cols)
    assert (
        rep.format == "preference"
        and ex[0]["prompt_ids"] == enc(tok, "Once", True)
        and ex[0]["margin"] == 1.5
    )
    _, rep = load_examples(
        "preference", str(write_jsonl(tmp_path / "m2.jsonl", [rows[0], {"question": "x"}])), tok, columns=cols
    )
    assert rep.skipped == {"missing_field": 1} and "mapped column 'good'" in rep.first_problems[0]
    with pytest.raises(ValueError, match="unknown canonical name 'answer'"):
        load_examples("preference", str(src), tok, columns={"answer": "good"})


def test_truncation(tok, tmp_path):
    prompt, long_resp = "one two three four five six seven", " and then the cat sat on the mat all day long"
    p, r = enc(tok, prompt, True), [*enc(tok, long_resp), 2]
    rows = [
        {"prompt": prompt, "chosen": long_resp, "rejected": " no."},
        {"prompt": prompt, "chosen": " a", "rejected": " b"},
    ]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    max_length = len(p) + 5
    ex, rep = load_examples("preference", str(src), tok, max_length=max_length)
    assert rep.truncated == 1 and rep.kept == 2
    assert (
        ex[0]["prompt_ids"] == p
        and ex[0]["chosen_ids"] == r[:5]
        and ex[0]["rejected_ids"] == [*enc(tok, " no."), 2]
    )
    # max_prompt_length keeps the prompt's last tokens; both rows count (once each) as truncated
    ex, rep = load_examples("preference", str(src), tok, max_length=100, max_prompt_length=4)
    assert rep.truncated == 2 and ex[0]["prompt_ids"] == p[-4:] and ex[0]["chosen_ids"] == r
    _, rep = load_examples(
        "preference", str(src), tok, max_length=len(p) + 5, max_prompt_length=4, max_rows=1
    )
    assert rep.truncated == 1 and rep.rows_read == 1
    with pytest.raises(ValueError, match="prompt_too_long"):
        load_examples("preference", str(src), tok, max_length=len(p))
    ex, rep = load_examples(
        "sft", str(write_jsonl(tmp_path / "s.jsonl", [{"text": prompt}])), tok, max_length=4
    )
    assert rep.truncated == 1 and ex[0]["input_ids"] == p[:4] == ex[0]["labels"]


def test_datasets_sources(tok, tmp_path):
    import datasets

    rows = [PAIR, {**PAIR, "prompt": "The dog"}, {**PAIR, "chosen": 7}]
    ok = rows[:2]
    expected = load_examples("preference", str(write_jsonl(tmp_path / "ref.jsonl", ok)), tok)[0]
    (tmp_path / "list.json").write_text(json.dumps(ok))
    (tmp_path / "data.json").write_text(json.dumps({"data": ok}))
    datasets.Dataset.from_list(ok).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ok).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(ok).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ok)}).save_to_disk(str(tmp_path / "dict"))
    for name in ("list.json", "data.json", "d.parquet", "d.csv", "disk"):
        ex, rep = load_examples("preference", str(tmp_path / name), tok)
        assert ex == expected and rep.format == "preference" and rep.kept == 2, name
    ex, _ = load_examples("preference", tmp_path / "dict", tok, split="test")
    assert ex == expected
    with pytest.raises(ValueError, match=r"split 'train' not in the saved DatasetDict \(has \['test'\]\)"):
        load_examples("preference", str(tmp_path / "dict"), tok)
    # a bad row in a datasets source is named by row (1-based)
    datasets.Dataset.from_list(
        [{"prompt": "a", "chosen": "b", "rejected": ""}, {"prompt": "", "chosen": "b", "rejected": "c"}]
    ).to_parquet(str(tmp_path / "bad.parquet"))
    _, rep = load_examples("preference", str(tmp_path / "bad.parquet"), tok)
    assert rep.first_problems == [f"{tmp_path / 'bad.parquet'}:row 2: empty_field: 'prompt' is empty"]


def test_missing_path_unsupported_and_hub_offline(tok, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_examples("preference", str(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"x\.txt: unsupported data file type"):
        load_examples("preference", str(tmp_path / "x.txt"), tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_examples("preference", str(tmp_path / "empty_dir"), tok)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"could not load hub dataset 'no-such-owner/no-such-set'.*pass that local path"
    ):
        load_examples("preference", "no-such-owner/no-such-set", tok)


def test_bad_arguments(tok, tmp_path):
    src = str(write_jsonl(tmp_path / "p.jsonl", [PAIR]))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_examples("dpo", src, tok)
    with pytest.raises(ValueError, match="fmt 'kto' does not fit kind 'preference'"):
        load_examples("preference", src, tok, fmt="kto")
    ex, rep = load_examples("preference", src, tok, fmt="preference")
    assert rep.format == "preference" and len(ex) == 1


def test_soft_label_p_chosen_reaches_the_batch(tok, tmp_path):
    from fastalign.data import PreferenceCollator

    rows = [
        {**PAIR, "p_chosen": 0.75},
        {**PAIR, "p_chosen": 1},
        {**PAIR, "p_chosen": 1.5},
        {**PAIR, "p_chosen": "x"},
    ]
    examples, report = load_examples("preference", str(write_jsonl(tmp_path / "p.jsonl", rows)), tok)
    assert report.kept == 2 and report.skipped.get("wrong_type") == 2
    assert [ex["p_chosen"] for ex in examples] == [0.75, 1.0]
    batch = PreferenceCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)(
        examples
    )
    assert batch["p_chosen"].tolist() == [0.75, 1.0] and batch["p_chosen"].dtype.is_floating_point
    plain, _ = load_examples("preference", str(write_jsonl(tmp_path / "q.jsonl", [PAIR, PAIR])), tok)
    assert "p_chosen" not in PreferenceCollator(
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    )(plain)
