"""README.md's "Train on your own data" lines run as written, one after another, on tiny data files
of each documented shape (the user's own `my_*.jsonl`), with only run length shortened: a wrong
key, a config that needs a column mapping, a reused run folder or a leftover reward function in
the docs fails here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from repo_assets import OASST, STORIES

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = " train.max_steps=2 train.save_every=0 train.tensorboard=false data.max_rows=16 train.batch_size=4"
ONLINE = " train.max_steps=1 train.tensorboard=false train.batch_size=2 generation.max_new_tokens=8"
SHORTEN = {
    "sft": OFFLINE,
    "rm": OFFLINE,
    "dpo": OFFLINE,
    "kto": OFFLINE,
    "ppo": ONLINE + " data.max_rows=4",
    "cai": " max_prompts=2 generation.max_new_tokens=8",
    "plot": "",
}


def _block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]


def _script(block: str) -> str:
    out = ["set -euo pipefail"]
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("source "):
            continue  # the venv's fastalign is on PATH
        if line.startswith("fastalign "):
            command, _, _ = line.partition("  #")
            out.append(command.rstrip() + SHORTEN[line.split()[1]])
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _data(work: Path) -> None:
    pairs = [json.loads(x) for x in OASST.read_text().splitlines()[:16]]
    rows = {
        "my_sft.jsonl": [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs],
        "my_pairs.jsonl": pairs,
        "my_kto.jsonl": [
            {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for p in pairs
            for k in ("chosen", "rejected")
        ],
        "my_prompts.jsonl": [{"prompt": p["prompt"]} for p in pairs],
    }
    for name, rs in rows.items():
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rs))


@pytest.mark.slow
def test_train_on_your_own_data_runs_in_order(tmp_path):
    block = _block()
    assert block.count("fastalign ") >= 7 and "/path/to/model" in block
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    _data(work)
    script = _script(block.replace("/path/to/model", str(STORIES)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1500
    )
    assert res.returncode == 0, res.stderr[-4000:]
    for run in ("own_sft", "own_rm", "own_dpo", "own_kto", "own_ppo"):
        assert (work / "runs" / run / "final" / "config.json").is_file(), run
        assert (work / "runs" / run / "config.yaml").is_file(), run
    assert (work / "runs" / "own_cai" / "sft.jsonl").is_file()
    assert list((work / "runs" / "own_dpo" / "plots").glob("*.png"))
    assert "rewards: reward model(s) runs/own_rm/final (weight 1)" in res.stderr
    assert "contains_word" not in res.stderr  # the shipped config's reward function is off
