"""The online recipes end to end on stories260k: PPO and GRPO raise a verifiable reward (the response
contains "play"; base rate ≈ 10 %) with the KL to the reference bounded, online DPO raises the score
of a reward model trained (rm recipe) to prefer such responses, PPO resumes exactly, the shared value
head trains and is not exported, and the CLI runs / rejects bad keys.

Margins were measured on this machine (see docs/rlhf.md for the curves): PPO 0.06 → 1.0 and GRPO
0.06 → 0.8 in about a dozen iterations; the asserted rises are less than half of that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from repo_assets import ASSETS

ROOT = Path(__file__).resolve().parents[2]
MODEL = ASSETS / "models" / "stories260k"

STARTS = [
    "Once upon a time", "Lily went to the park", "Tom had a big red ball", "The cat sat on the mat",
    "One day, a little girl", "Ben and his dog", "The sun was hot", "Mom said to Sue",
    "A bird flew to the tree", "Sam found a box", "The boy wanted a toy", "Anna liked to draw",
    "There was a small frog", "Tim and Mia were friends", "The dog ran fast", "Grandma made a cake",
]  # fmt: skip
WORD = "play"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in STARTS))
    return path


def _cfg(method: str, out: Path, prompts: Path, *overrides: str):
    from fastalign.config import RECIPES, load_config

    base = [
        f"model.path={MODEL}", "model.dtype=float32", f"data.train={prompts}", "data.max_prompt_length=32",
        f"train.output_dir={out}", "train.lr=3e-4", "train.schedule=constant", "train.tensorboard=false",
        "train.progress=false", "train.resume=never", "train.export=false", "train.threads=2",
        "generation.max_new_tokens=20", "generation.batch_size=64",
        "reward.function=fastalign.rollout.verifiers:contains_word",
        f"reward.function_kwargs={{word: {WORD}}}",
    ]  # fmt: skip
    return load_config(RECIPES[method], None, [*base, *overrides])


def _run(method: str, cfg):
    from fastalign.recipes import REGISTRY

    return REGISTRY[method].run(cfg)


def _curve(out: Path, key: str) -> list[float]:
    from fastalign.trainers.metrics import read_metrics

    return [r[key] for r in read_metrics(out) if r["split"] == "train"]


def _rise(xs: list[float], k: int = 3) -> float:
    return sum(xs[-k:]) / k - sum(xs[:k]) / k


def test_ppo_raises_reward_with_bounded_kl(prompts, tmp_path):
    cfg = _cfg("ppo", tmp_path, prompts, "train.max_steps=10", "train.batch_size=16", "kl.coef=0.02")
    result = _run("ppo", cfg)
    reward, kl = _curve(tmp_path, "reward/mean"), _curve(tmp_path, "kl")
    assert result.steps == 10 and len(reward) == 10
    assert _rise(reward) > 0.3, reward
    assert max(kl) < 30.0, kl
    m = result.final_metrics
    for key in ("value/loss", "value/explained_var", "policy/clipfrac", "policy/approx_kl", "entropy",
                "response/eos_rate", "kl_coef", "grad_norm", "lr"):  # fmt: skip
        assert key in m and m[key] == m[key], key


def test_grpo_raises_reward_with_bounded_kl(prompts, tmp_path):
    cfg = _cfg("grpo", tmp_path, prompts, "train.max_steps=10", "train.batch_size=4", "grpo.group_size=4")
    result = _run("grpo", cfg)
    reward, kl = _curve(tmp_path, "reward/mean"), _curve(tmp_path, "kl")
    assert result.steps == 10
    assert _rise(reward) > 0.25, reward
    assert max(kl) < 30.0, kl


@pytest.fixture(scope="module")
def reward_model(prompts, tmp_path_factory) -> Path:
    """A stories260k reward model trained (rm recipe) on the policy's own samples: chosen contains
    WORD, rejected does not."""
    from fastalign.config import GenerationConfig, RMRecipe, load_config
    from fastalign.models import load_causal_lm, load_tokenizer
    from fastalign.rollout.generate import generate
    from fastalign.rollout.verifiers import contains_word
    from fastalign.trainers import loop, rm

    os.environ["HF_HUB_OFFLINE"] = "1"
    tmp = tmp_path_factory.mktemp("rm")
    tok, model = load_tokenizer(str(MODEL)), load_causal_lm(str(MODEL), dtype="float32")
    rows = STARTS * 12
    g = generate(
        model,
        tok,
        [tok(p).input_ids for p in rows],
        GenerationConfig(max_new_tokens=20, batch_size=96),
        seed=1,
    )
    hit = contains_word(rows, g.texts, word=WORD)
    good = [(p, t) for p, t, h in zip(rows, g.texts, hit, strict=True) if h]
    bad = [(p, t) for p, t, h in zip(rows, g.texts, hit, strict=True) if not h]
    assert len(good) >= 10, len(good)
    pairs = [
        {"prompt": bad[i][0], "chosen": good[i % len(good)][1], "rejected": bad[i][1]}
        for i in range(len(bad))
    ]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = load_config(RMRecipe, None, [
        f"model.path={MODEL}", "model.dtype=float32", f"data.train={data}", "data.max_length=64",
        f"train.output_dir={tmp / 'run'}", "train.batch_size=16", "train.max_steps=40", "train.lr=2e-3",
        "train.tensorboard=false", "train.progress=false", "train.resume=never", "train.threads=2",
    ])  # fmt: skip
    loop.run(cfg, rm.build(cfg))
    return tmp / "run" / "final"


def test_online_dpo_raises_reward_model_score(prompts, reward_model, tmp_path):
    cfg = _cfg(
        "online-dpo", tmp_path, prompts, "train.max_steps=10", "train.batch_size=8",
        "online_dpo.num_samples=4", "reward.function=null", f"reward.models=[{reward_model}]",
    )  # fmt: skip
    _run("online-dpo", cfg)
    reward = _curve(tmp_path, "reward/mean")
    std = _curve(tmp_path, "reward/std")
    assert _rise(reward) > 0.5 * std[0], (reward, std)


def test_ppo_resume_matches_uninterrupted_run(prompts, tmp_path):
    """Iterations 3–4 after resuming from the iteration-2 checkpoint equal the uninterrupted run's
    (seeded sampling, RNG / optimizers / KL controller restored)."""
    over = ["train.max_steps=4", "train.batch_size=4", "train.save_every=2", "generation.max_new_tokens=8",
            "kl.adaptive=true", "kl.target=1.0", "ppo.target_kl=1.0"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    _run("ppo", _cfg("ppo", a, prompts, *over))
    _run("ppo", _cfg("ppo", b, prompts, *over))
    import shutil

    shutil.rmtree(b / "checkpoints" / "step-00000004")
    result = _run("ppo", _cfg("ppo", b, prompts, *over, "train.resume=auto"))
    assert result.resumed_from is not None and result.resumed_from.name == "step-00000002"
    from fastalign.trainers.metrics import read_metrics

    ra = {r["step"]: r for r in read_metrics(a)}
    rb = {r["step"]: r for r in read_metrics(b)}
    assert sorted(rb) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "kl", "kl_coef", "loss", "value/loss", "policy/approx_kl"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_ppo_shared_value_head_trains_and_is_not_exported(prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg("ppo", tmp_path, prompts, "train.max_steps=2", "train.batch_size=4", "ppo.value_model=shared",
               "generation.max_new_tokens=8", "train.export=true")  # fmt: skip
    from fastalign.trainers import ppo, rollout_loop

    algo = ppo.build(cfg)
    head0 = algo.trainables[0].model.value_head.weight.detach().clone()
    result = rollout_loop.run(cfg, algo)
    assert len(algo.trainables) == 1 and "value/loss" in result.final_metrics
    assert not torch.equal(head0, algo.trainables[0].model.value_head.weight)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert not any("value_head" in k for k in f.keys())
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))


def test_cli_runs_grpo_and_rejects_bad_keys(tmp_path, monkeypatch, capsys):
    from fastalign.cli import main

    monkeypatch.chdir(ROOT)
    args = ["grpo", "--config", "configs/grpo.yaml", f"train.output_dir={tmp_path}", "train.max_steps=1",
            "train.batch_size=2", "generation.max_new_tokens=6", "train.export=false",
            "data.max_rows=8"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "config.yaml").is_file()
    assert "[grpo] done: 1 steps" in capsys.readouterr().out
    monkeypatch.delenv("FASTALIGN_DEBUG", raising=False)
    assert main(["ppo", "--config", "configs/ppo.yaml", "ppo.clip=0.3"]) == 2
    assert "ppo.clip" in capsys.readouterr().err
    assert main(["online-dpo", "--config", "configs/online_dpo.yaml", "online_dpo.num_samples=1"]) == 2
    assert "online_dpo.num_samples" in capsys.readouterr().err


def test_rollout_configs_round_trip_and_validate(tmp_path):
    from fastalign.config import GRPORecipe, OnlineDPORecipe, PPORecipe, load_config, save_config

    over = ["reward.function=my.mod:fn", "reward.function_kwargs={word: x, n: 3}", "data.columns.prompt=q"]
    for cls in (PPORecipe, GRPORecipe, OnlineDPORecipe):
        cfg = load_config(cls, None, over)
        save_config(cfg, tmp_path / f"{cls.method}.yaml")
        assert load_config(cls, tmp_path / f"{cls.method}.yaml") == cfg
        assert cfg.reward.function_kwargs == {"word": "x", "n": 3}
    assert load_config(GRPORecipe, None, over).kl.estimator == "k3"
    bad = {
        PPORecipe: [("ppo.value_model=shared", "ppo.value_path=v"), ("ppo.lam=1.5",)],
        GRPORecipe: [("grpo.group_size=1",), ("grpo.agg=mean",)],
        OnlineDPORecipe: [
            ("online_dpo.ref_refresh=true", "online_dpo.reference=r"),
            ("online_dpo.loss_type=x",),
        ],
    }
    for cls, cases in bad.items():
        for case in cases:
            key = case[-1].split("=")[0] if "ref_refresh" not in case[0] else "online_dpo.ref_refresh"
            key = "ppo.value_path" if "value_path" in case[-1] else key
            with pytest.raises(ValueError, match=key.replace(".", r"\.")):
                load_config(cls, None, [*over, *case])
    with pytest.raises(ValueError, match=r"data\.columns"):
        load_config(PPORecipe, None, [*over, "data.columns.chosen=c"])
    with pytest.raises(ValueError, match=r"reward\.models"):
        load_config(PPORecipe, None, [])  # no reward source
