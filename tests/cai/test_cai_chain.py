"""The whole chain on stories260k: `cai revise` -> `fastalign sft` -> `cai label` (sampling from the
SFT model) -> `fastalign dpo` (CLI, 2 steps each) and `rm`, on the produced files without any
conversion; and chat-format rows (models with a chat template) load through the data loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from repo_assets import ASSETS

ROOT = Path(__file__).resolve().parents[2]
STORIES = ASSETS / "models" / "stories260k"
TINY = """\
- {id: harmful, critique: Say how the last response is harmful., revision: Please rewrite it to be harmless.}
- {id: kind, critique: Say how the last response is unkind., revision: Please rewrite it to be kind.}
"""
SHORT = [
    "train.max_steps=2",
    "train.warmup_steps=0",
    "train.eval_every=0",
    "train.save_every=0",
    "train.tensorboard=false",
    "train.progress=false",
    "data.eval_fraction=0",
    "data.columns={}",
]


def _cli(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "fastalign.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_revise_sft_label_dpo_rm_chain(tmp_path):
    from fastalign.cai.cli import run
    from fastalign.cli import run_recipe

    (tmp_path / "tiny.yaml").write_text(TINY)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Can I lie?", "Tell me a joke.", "Hi!"])
    )
    common = [
        f"constitution={tmp_path / 'tiny.yaml'}",
        f"prompts={prompts}",
        "generation.max_new_tokens=8",
        "generation.batch_size=3",
        "progress=false",
    ]
    run("revise", None, [f"model.path={STORIES}", f"output_dir={tmp_path / 'revise'}", *common])
    sft_rows = tmp_path / "revise" / "sft.jsonl"
    assert len(sft_rows.read_text().splitlines()) >= 2

    _cli(
        "sft",
        "--config",
        "configs/sft.yaml",
        f"model.path={STORIES}",
        f"data.train={sft_rows}",
        "data.format=auto",
        "data.packing=false",
        "train.batch_size=2",
        f"train.output_dir={tmp_path / 'sft'}",
        *SHORT,
    )
    policy = tmp_path / "sft" / "final"
    assert (policy / "model.safetensors").is_file()

    run(
        "label",
        None,
        [
            f"model.path={policy}",
            f"feedback_model.path={STORIES}",
            "num_responses=3",
            f"output_dir={tmp_path / 'label'}",
            *common,
        ],
    )
    pairs = tmp_path / "label" / "pairs.jsonl"
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(rows) >= 4 and all(0.5 <= r["p_chosen"] <= 1.0 for r in rows)

    _cli(
        "dpo",
        "--config",
        "configs/dpo.yaml",
        f"model.path={policy}",
        f"data.train={pairs}",
        "dpo.soft_labels=true",
        "dpo.precompute_ref_logps=false",
        "train.batch_size=2",
        f"train.output_dir={tmp_path / 'dpo'}",
        *SHORT,
    )
    assert (tmp_path / "dpo" / "final" / "model.safetensors").is_file()
    result = run_recipe(
        "rm",
        str(ROOT / "configs" / "rm.yaml"),
        [
            f"model.path={policy}",
            f"data.train={pairs}",
            "train.batch_size=2",
            "train.export=false",
            "rm.soft_labels=true",
            f"train.output_dir={tmp_path / 'rm'}",
            *SHORT,
        ],
    )
    assert result.steps == 2


def test_chat_rows_load_as_sft_and_preference_data(tmp_path):
    """Chat rows (written when the model has a chat template) are templated by the data loader."""
    from fastalign.cai import label, revise
    from fastalign.data.loader import load_examples
    from fastalign.models import load_tokenizer

    tok = load_tokenizer(str(STORIES))
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    trace = {"prompt": "Can I lie?", "final": "No, honesty matters.", "rounds": [], "format": "chat"}
    (sft,) = revise.rows(trace)
    assert sft == {
        "prompt": "Can I lie?",
        "completion": [{"role": "assistant", "content": "No, honesty matters."}],
    }
    comp = {"i": 0, "j": 1, "principle": "kind", "p_a": [0.2, 0.6], "p_first": 0.3}
    (pair,) = label.rows({"prompt": "Q?", "responses": ["x", "y"], "comparisons": [comp], "format": "chat"})
    assert pair["chosen"] == [{"role": "assistant", "content": "y"}] and pair["p_chosen"] == pytest.approx(
        0.7
    )
    assert pair["p_order1"] == pytest.approx(0.6) and pair["p_order2"] == pytest.approx(
        0.8
    )  # y as (A), as (B)
    (tmp_path / "sft.jsonl").write_text(json.dumps(sft) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (ex,), rep = load_examples("sft", tmp_path / "sft.jsonl", tok, strict=True)
    assert rep.format == "chat"
    assert tok.decode([t for t in ex["labels"] if t >= 0]).startswith("No, honesty matters.")
    (ex,), rep = load_examples("preference", tmp_path / "pairs.jsonl", tok, strict=True)
    assert rep.format == "chat" and "<|assistant|>" in tok.decode(ex["prompt_ids"])


@pytest.mark.slow
def test_docs_smoke_block_runs_as_written(tmp_path):
    """docs/cai.md's stories260k block, verbatim, from a folder laid out like the repository."""
    import re

    text = (ROOT / "docs" / "cai.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", text.split("## Smoke run", 1)[1], flags=re.S)[0]
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "examples"):
        (work / name).symlink_to(ROOT / name)
    (work / "assets").symlink_to(ROOT / "assets")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the venv's `fastalign`
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + block],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (work / "runs" / "smoke_label" / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(0.5 <= r["p_chosen"] <= 1 for r in rows)
    assert (work / "runs" / "smoke_dpo" / "final" / "model.safetensors").is_file()
