"""`fastalign cai revise` on stories260k with a two-principle constitution: well-formed SFT rows and
traces, degenerate revisions kept out, resume after a stop with a torn last line, refusal to resume
a changed run, few-shot and prompt files."""

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
PROMPTS = ["How do I pick a lock?", "Tell me a mean joke.", "Can I skip school?", "Is it ok to lie?"]


def _inputs(d: Path) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tiny.yaml").write_text(TINY)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return d / "tiny.yaml", d / "prompts.jsonl"


def _revise(inputs: Path, out: Path, *extra: str) -> dict:
    args = [
        f"model.path={STORIES}",
        f"prompts={inputs / 'prompts.jsonl'}",
        f"constitution={inputs / 'tiny.yaml'}",
        f"output_dir={out}",
        "rounds=2",
        "generation.max_new_tokens=6",
        "generation.batch_size=2",
        "progress=false",
        *extra,
    ]
    return run("revise", None, args)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted run over the 4 prompts (2 batches, 2 rounds)."""
    root = tmp_path_factory.mktemp("revise")
    _inputs(root)
    summary = _revise(root, root / "full")
    return root, root / "full", summary


def test_rows_and_traces_are_well_formed(full):
    _, out, summary = full
    assert summary["written"] == 4 and summary["resumed"] == 0
    traces, sft = _lines(out / "trace.jsonl"), _lines(out / "sft.jsonl")
    assert [t["index"] for t in traces] == [0, 1, 2, 3]
    assert [t["prompt"] for t in traces] == PROMPTS
    for t in traces:
        assert set(t) >= {"prompt", "initial", "rounds", "final", "seed"}
        assert len(t["rounds"]) == 2
        current = t["initial"]
        for r in t["rounds"]:
            assert r["principle"] in ("harmful", "kind")
            assert isinstance(r["critique"], str) and isinstance(r["revision"], str)
            current = current if "kept_previous" in r else r["revision"]
        assert t["final"] == current  # the last accepted revision
    kept = [t for t in traces if not t.get("skipped")]
    assert len(sft) == len(kept)
    for row, t in zip(sft, kept, strict=True):
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"] == f"\n\nHuman: {t['prompt']}\n\nAssistant:"  # no chat template: transcript
        assert row["completion"] == " " + t["final"]
    # principle choice is per prompt (seeded by index): different prompts draw different sequences
    assert len({tuple(r["principle"] for r in t["rounds"]) for t in traces}) > 1 or len(traces) < 3


def test_resume_after_stop_and_torn_line_equals_uninterrupted_run(full):
    root, ref, _ = full
    out = root / "resumed"
    first = _revise(root, out, "stop_after=3")  # stops inside batch 1 (prompts 2, 3)
    assert first["written"] == 3 and len(_lines(out / "trace.jsonl")) == 3
    with open(out / "trace.jsonl", "a") as f:  # a kill in the middle of writing prompt 3's trace
        f.write('{"index": 3, "key": "3:0f3a", "prompt": "Is it')
    with open(out / "sft.jsonl", "a") as f:
        f.write('{"prompt": "\\n\\nHuman: Is')
    second = _revise(root, out)
    assert second["resumed"] == 3 and second["written"] == 1
    assert (out / "trace.jsonl").read_bytes() == (ref / "trace.jsonl").read_bytes()
    assert (out / "sft.jsonl").read_bytes() == (ref / "sft.jsonl").read_bytes()
    third = _revise(root, out)  # nothing left: no duplicates
    assert third["written"] == 0 and len(_lines(out / "trace.jsonl")) == 4


def test_changed_config_or_input_is_refused_unless_resume_is_off(tmp_path):
    _inputs(tmp_path)
    out = tmp_path / "run"
    assert _revise(tmp_path, out, "stop_after=1")["written"] == 1
    with pytest.raises(ValueError, match=r"another config \(.*rounds: 2 -> 1"):
        _revise(tmp_path, out, "rounds=1")
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "One more?"}) + "\n")
    with pytest.raises(ValueError, match=r"changed since this run started: .*prompts\.jsonl"):
        _revise(tmp_path, out)
    fresh = _revise(tmp_path, out, "rounds=1", "max_prompts=1", "resume=false")
    assert fresh["written"] == 1 and fresh["resumed"] == 0
    traces = _lines(out / "trace.jsonl")
    assert len(traces) == 1 and len(traces[0]["rounds"]) == 1


def test_degenerate_revisions_keep_the_previous_response(monkeypatch):
    from fastalign.cai import prompts
    from fastalign.cai.config import ReviseConfig
    from fastalign.cai.constitution import Principle
    from fastalign.cai.revise import Item, degenerate, revise_batch

    p = Principle("p", "Say what is wrong.", "Please rewrite it.")
    replies = iter(
        [
            ["first a", "first b"],  # initial
            ["crit a", "crit b"],
            ["", "   ...   "],  # round 1 revisions: empty, no words
            ["crit a2", "crit b2"],
            ["please rewrite it.", "better b"],  # round 2: echoes the request; a real revision
        ]
    )
    seen = []

    def fake(model, tok, conversations, gen, seed):
        seen.append((len(conversations), seed))
        texts = next(replies)
        return [prompts.clean_reply(t, []) for t in texts], [False] * len(texts)

    monkeypatch.setattr(prompts, "sample_replies", fake)
    items = [Item(0, "0:x", "question a"), Item(1, "1:y", "question b")]
    cfg = ReviseConfig(rounds=2)
    traces = revise_batch(None, None, items, [p], [], cfg, batch_no=0)
    a, b = traces
    assert a["rounds"][0]["kept_previous"] == "empty revision"
    assert b["rounds"][0]["kept_previous"] == "revision has no words"
    assert a["rounds"][1]["kept_previous"] == "revision repeats the revision request"
    assert "kept_previous" not in b["rounds"][1]
    assert a["final"] == "first a" and b["final"] == "better b"
    assert [n for n, _ in seen] == [2] * 5 and len({s for _, s in seen}) == 5  # one seed per stage
    assert degenerate("A fine answer.", "Please rewrite it.") is None


def test_prompt_builders_and_few_shot(tmp_path):
    from fastalign.cai.constitution import Principle
    from fastalign.cai.prompts import (
        clean_reply,
        critique_messages,
        load_few_shot,
        raw_prompt,
        revision_messages,
        transcript,
    )

    p = Principle("p", "Critique it.", "Revise it.")
    shots = tmp_path / "shots.jsonl"
    shots.write_text(
        json.dumps({"prompt": "Q0", "response": "R0", "critique": "C0", "revision": "V0"}) + "\n"
    )
    few = load_few_shot(str(shots))
    msgs = revision_messages("Q", "R", "C", p, few)
    assert [m["content"] for m in msgs] == [
        "Q0",
        "R0",
        "Critique it.",
        "C0",
        "Revise it.",
        "V0",
        "Q",
        "R",
        "Critique it.",
        "C",
        "Revise it.",
    ]
    assert [m["role"] for m in msgs][-1] == "user"
    assert critique_messages("Q", "R", p)[-1] == {"role": "user", "content": "Critique it."}
    text = transcript(critique_messages("Q", "R", p))
    assert text == "\n\nHuman: Q\n\nAssistant: R\n\nHuman: Critique it.\n\nAssistant:"
    assert clean_reply(" fine answer\n\nHuman: next", ["\n\nHuman:"]) == "fine answer"
    assert raw_prompt("\n\nHuman: Q?\n\nAssistant:") == "Q?" and raw_prompt("Q?") == "Q?"
    shots.write_text(json.dumps({"prompt": "Q0", "response": "R0", "critique": "", "revision": "V0"}) + "\n")
    with pytest.raises(ValueError, match=r"shots\.jsonl:1: field 'critique' must be a non-empty string"):
        load_few_shot(str(shots))


def test_bad_prompt_rows_name_file_and_line(tmp_path):
    from fastalign.cai.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a non-empty 'prompt' string"):
        load_prompts(str(path))
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: invalid_json"):
        load_prompts(str(path))


def test_read_traces_cuts_a_torn_tail_and_refuses_a_corrupt_middle(tmp_path):
    from fastalign.cai.cli import read_traces

    path = tmp_path / "trace.jsonl"
    path.write_bytes(b'{"key": "0:a"}\n{"key": "1:b"}\n{"key": "2:')  # killed mid-line
    assert [t["key"] for t in read_traces(path)] == ["0:a", "1:b"]
    assert path.read_bytes() == b'{"key": "0:a"}\n{"key": "1:b"}\n'  # the next append starts clean
    path.write_bytes(b'{"key": "0:a"}\n{"key": "1:b"}')  # complete JSON but no newline: still torn
    assert [t["key"] for t in read_traces(path)] == ["0:a"]
    path.write_bytes(b'{"key": "0:a"}\n{"key": \n{"key": "2:c"}\n')
    with pytest.raises(ValueError, match=r"trace\.jsonl:2: corrupt trace line"):
        read_traces(path)
    assert read_traces(tmp_path / "absent.jsonl") == []


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path):
    """A real kill: the CLI in a subprocess is SIGKILLed once its first trace lines are on disk;
    running the same command again finishes the job with byte-identical files (nothing lost,
    nothing written twice)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path
    (root / "tiny.yaml").write_text(TINY)
    prompts = [f"{p} (case {i})" for i in range(4) for p in PROMPTS]  # 16 prompts, one per batch
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")

    def cmd(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "fastalign.cli", "cai", "revise", f"model.path={STORIES}",
            f"prompts={root / 'prompts.jsonl'}", f"constitution={root / 'tiny.yaml'}", f"output_dir={out}",
            "rounds=2", "generation.max_new_tokens=8", "generation.batch_size=1", "progress=false",
        ]  # fmt: skip

    subprocess.run(cmd(root / "ref"), env=env, check=True, timeout=300, capture_output=True)
    killed = subprocess.Popen(
        cmd(root / "out"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    trace = root / "out" / "trace.jsonl"
    deadline = time.monotonic() + 300
    while not (trace.is_file() and trace.read_text().count("\n") >= 2):
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    done_before = len(trace.read_text().splitlines())
    assert 2 <= done_before < len(prompts), done_before
    subprocess.run(cmd(root / "out"), env=env, check=True, timeout=300, capture_output=True)
    assert trace.read_bytes() == (root / "ref" / "trace.jsonl").read_bytes()
    assert (root / "out" / "sft.jsonl").read_bytes() == (root / "ref" / "sft.jsonl").read_bytes()
