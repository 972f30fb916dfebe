"""The CLI describes itself: `--help` lists every config key with type, default and meaning (from
the dataclasses), `fastalign configs` lists and copies the shipped recipes, `--config NAME` uses
one, an argparse-style `--lr` gets the key=value it meant, config warnings are one line."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from fastalign.cai.config import CAI_RECIPES
from fastalign.cli import main, shipped_configs
from fastalign.config import RECIPES
from fastalign.config.loader import _all_keys, describe_keys

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's --help / usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("cls", [*RECIPES.values(), *CAI_RECIPES.values()], ids=lambda c: c.method)
def test_every_config_key_has_a_one_line_meaning(cls):
    rows = describe_keys(cls)
    assert rows and not [k for k, _, _, doc in rows if not doc], "keys without a docstring"
    keys = _all_keys(cls)
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    assert [k for k, *_ in rows] == leaves


def test_recipe_help_lists_keys_types_defaults_and_loss_types():
    code, out, _ = run("dpo", "--help")
    assert code == 0
    assert "train.lr" in out and "float = 5e-06: peak learning rate (AdamW)" in out
    assert "dpo.beta" in out and "model.lora.r" in out and "engine.zero_stage" in out
    assert "dpo.loss_type (method dpo), online_dpo.loss_type:" in out and "apo_zero" in out
    code, out, _ = run("ppo", "--help")
    assert "train.batch_size" in out and "prompts per rank per iteration" in out
    assert "train.fused" not in out and "ppo.vf_coef" in out


def test_cai_help_lists_its_own_keys_not_train_lr():
    code, out, _ = run("cai", "revise", "--help")
    assert code == 0 and "train.lr" not in out and "generation.max_new_tokens" in out


def test_an_argparse_style_option_gets_the_key_it_meant():
    code, _, err = run("dpo", "--lr", "1e-5")
    assert code == 2 and "write the config key as train.lr=1e-5" in err
    code, _, err = run("dpo", "--beta=0.3")
    assert code == 2 and "dpo.beta=0.3" in err
    code, _, err = run("sft", "--frobnicate", "1")
    assert code == 2 and "config keys are set as key=value" in err


def test_configs_lists_copies_and_runs_by_name(tmp_path, monkeypatch):
    code, out, _ = run("configs")
    assert code == 0
    for name in ("dpo", "ppo", "sft", "kto", "cai_revise"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert set(shipped_configs()) == {
        p.stem for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".json")
    }
    code, out, _ = run("configs", "cp", "dpo", str(tmp_path))
    assert code == 0 and (tmp_path / "dpo.yaml").read_text() == (ROOT / "configs" / "dpo.yaml").read_text()
    code, _, err = run("configs", "cp", "dpo", str(tmp_path / "dpo.yaml"))
    assert code == 2 and "exists" in err  # never overwrites
    code, _, err = run("configs", "cp", "nope", str(tmp_path))
    assert code == 2 and "no shipped config 'nope'" in err
    monkeypatch.chdir(ROOT)
    code, out, _ = run("dpo", "--config", "dpo", "--print-config")
    assert code == 0 and "loss_type: sigmoid" in out


def test_a_config_warning_is_one_plain_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fastalign.cli", "dpo", "--config", "configs/dpo.yaml", "train.max_steps=2",
         "train.warmup_steps=4", "--print-config"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fastalign dpo: warning: train.warmup_steps=4 >= train.max_steps=2: the run ends before the lr "
        "reaches its peak"
    ]
