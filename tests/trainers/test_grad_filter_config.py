"""`train.grad_filter` reaches the fused op in every recipe: in fp32 'auto' is exact (the same
losses as null, to the bit, and no filter runs), a coarse filter runs in each step's backward, and
the online recipes build their fused loss with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_assets import OASST, PANDALM, STORIES

MODEL = STORIES


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


def _cfg(method: str, out: Path, *overrides: str):
    from fastalign.config import RECIPES, load_config

    if method in ("ppo", "grpo", "online-dpo"):
        return _online_cfg(method, out, *overrides)
    base = [
        f"model.path={MODEL}", "model.dtype=float32", f"data.train={PANDALM}", "data.max_length=128",
        "data.max_prompt_length=64", "data.max_rows=32", f"train.output_dir={out}", "train.batch_size=8",
        "train.max_steps=3", "train.lr=3e-3", "train.tensorboard=false", "train.progress=false",
        "train.resume=never", "train.export=false", "train.threads=2",
    ]  # fmt: skip
    return load_config(RECIPES[method], None, [*base, *overrides])


def _online_cfg(method: str, out: Path, *overrides: str):
    from fastalign.config import RECIPES, load_config

    prompts = out.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Once upon a time {i}"}) + "\n" for i in range(8)))
    base = [
        f"model.path={MODEL}", "model.dtype=float32", f"data.train={prompts}", "data.max_prompt_length=32",
        f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=4", "train.tensorboard=false",
        "train.progress=false", "train.resume=never", "train.export=false", "train.threads=2",
        "generation.max_new_tokens=4", "reward.function=fastalign.rollout.verifiers:contains_word",
        "reward.function_kwargs={word: the}",
    ]  # fmt: skip
    return load_config(RECIPES[method], None, [*base, *overrides])


def _losses(method: str, out: Path, *overrides: str) -> list[float]:
    from fastalign.trainers import dpo, kto, loop, sft
    from fastalign.trainers.metrics import read_metrics

    cfg = _cfg(method, out, *overrides)
    loop.run(cfg, {"sft": sft.build, "dpo": dpo.build, "kto": kto.build}[method](cfg))
    return [r["loss"] for r in read_metrics(out) if r["split"] == "train"]


def test_config_accepts_auto_null_and_a_fraction(tmp_path):
    assert _cfg("dpo", tmp_path).train.grad_filter == "auto"
    assert _cfg("dpo", tmp_path, "train.grad_filter=null").train.grad_filter is None
    assert _cfg("dpo", tmp_path, "train.grad_filter=0.00390625").train.grad_filter == 2**-8
    assert _cfg("ppo", tmp_path / "ppo", "train.grad_filter=1e-3").train.grad_filter == 1e-3
    for bad in ("1.5", "-0.1", "fast"):
        with pytest.raises(ValueError, match="grad_filter"):
            _cfg("dpo", tmp_path, f"train.grad_filter={bad}")


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("sft", ["data.format=sft", "data.columns.completion=chosen"]),
        ("dpo", []),
        ("kto", [f"data.train={OASST}"]),
    ],
)
def test_offline_recipes_pass_it_to_the_op(tmp_path, method, overrides):
    from fastalign.ops.linear_logprobs import grad_filter_stats

    exact = _losses(method, tmp_path / "null", *overrides, "train.grad_filter=null")
    with grad_filter_stats() as auto_stats:
        auto = _losses(method, tmp_path / "auto", *overrides)
    with grad_filter_stats() as coarse_stats:
        _losses(method, tmp_path / "coarse", *overrides, "train.grad_filter=0.5")
    assert auto == exact and auto_stats == []  # fp32: 'auto' is the exact backward, no filter ran
    # one filtered backward per step (stories260k's 512 tokens: two blocks, the label's always kept)
    assert [r["budget"] for r in coarse_stats] == [0.5] * 3
    assert sum(r["pairs"] - r["kept"] for r in coarse_stats) > 0  # and it dropped blocks


@pytest.mark.parametrize("method", ["ppo", "grpo", "online-dpo"])
def test_online_recipes_build_their_loss_with_it(tmp_path, monkeypatch, method):
    import fastalign.losses.fused_linear as fused_linear
    from fastalign.recipes import REGISTRY

    seen = []
    check = fused_linear._check_grad_filter
    monkeypatch.setattr(fused_linear, "_check_grad_filter", lambda op, g: seen.append(g) or check(op, g))
    REGISTRY[method].run(_cfg(method, tmp_path / "run", "train.grad_filter=0.125"))
    assert 0.125 in seen, seen
