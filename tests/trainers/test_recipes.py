"""End-to-end recipes on the real tiny model (stories260k) and real preference data (assets/).

Each recipe trains a few dozen steps: the loss falls, held-out accuracy beats chance where it is
defined, fused and unfused paths follow the same trajectory, a SIGKILLed run resumes exactly, and
the exported model reloads in plain transformers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from repo_assets import OASST, PANDALM, STORIES

ROOT = Path(__file__).resolve().parents[2]
MODEL = STORIES


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


def _cfg(method: str, out: Path, *overrides: str):
    from fastalign.config import RECIPES, load_config

    base = [
        f"model.path={MODEL}",
        "model.dtype=float32",
        f"data.train={PANDALM}",
        "data.max_length=192",
        "data.max_prompt_length=96",
        f"train.output_dir={out}",
        "train.batch_size=8",
        "train.max_steps=30",
        "train.lr=2e-3",
        "train.warmup_steps=2",
        "train.tensorboard=false",
        "train.progress=false",
        "train.resume=never",
        "train.export=false",
        "train.threads=2",
    ]
    return load_config(RECIPES[method], None, [*base, *overrides])


def _train(method: str, out: Path, *overrides: str):
    from fastalign.trainers import dpo, kto, loop, rm, sft

    cfg = _cfg(method, out, *overrides)
    task = {"sft": sft.build, "rm": rm.build, "dpo": dpo.build, "kto": kto.build}[method](cfg)
    result = loop.run(cfg, task)
    return task, result, _losses(out)


def _losses(out: Path, split: str = "train") -> dict[int, float]:
    from fastalign.trainers.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out) if r["split"] == split}


def _falls(losses: dict[int, float], k: int = 5) -> tuple[float, float]:
    steps = sorted(losses)
    head = sum(losses[s] for s in steps[:k]) / k
    tail = sum(losses[s] for s in steps[-k:]) / k
    return head, tail


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("sft", ["data.format=sft", "data.columns.completion=chosen", "train.lr=3e-3"]),
        ("sft", ["data.format=sft", "data.columns.completion=chosen", "train.lr=3e-3", "data.packing=true"]),
        ("dpo", ["dpo.loss_type=sigmoid", "dpo.precompute_ref_logps=true"]),
        ("dpo", ["dpo.loss_type=hinge"]),
        ("dpo", ["dpo.method=ipo"]),
        ("dpo", ["dpo.method=simpo", "dpo.beta=2.0"]),
        ("dpo", ["dpo.method=orpo"]),
        ("dpo", ["dpo.loss_type=robust", "dpo.label_smoothing=0.1", "data.packing=true"]),
        ("kto", [f"data.train={OASST}", "kto.precompute_ref_logps=true"]),
        ("rm", ["train.lr=3e-3"]),
    ],
    ids=["sft", "sft-packed", "dpo", "dpo-hinge", "ipo", "simpo", "orpo", "robust-packed", "kto", "rm"],
)
def test_recipe_loss_falls(tmp_path, method, overrides):
    """64 pairs, 30 steps of 8 (about 4 epochs): the recipe must fit its training rows."""
    _, _, losses = _train(method, tmp_path, "data.max_rows=64", "train.lr=1e-3", *overrides)
    assert len(losses) == 30
    head, tail = _falls(losses)
    assert tail < head, f"{method} {overrides}: loss did not fall ({head:.4f} -> {tail:.4f})"
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set(rows[-1])
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_mb"} <= keys
    if method in ("dpo", "rm"):
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= keys


@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_heldout_accuracy_beats_chance(tmp_path, method):
    """Train on PandaLM pairs, evaluate on a held-out 20%: the preference accuracy beats chance."""
    overrides = ["data.eval_fraction=0.2", "train.max_steps=60", "train.eval_batch_size=32"]
    if method == "dpo":
        overrides += ["dpo.precompute_ref_logps=true", "dpo.beta=0.5", "train.lr=1e-4"]
    _, result, _ = _train(method, tmp_path, *overrides)
    acc = result.eval_metrics["rewards/accuracies"]
    assert acc > 0.55, f"{method}: held-out accuracy {acc:.3f} is not above chance"


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("dpo", ["dpo.loss_type=sigmoid"]),
        ("dpo", ["dpo.method=orpo", "data.packing=true"]),
        ("sft", ["data.format=sft", "data.columns.completion=chosen"]),
        ("kto", [f"data.train={OASST}"]),
    ],
    ids=["dpo", "orpo-packed", "sft", "kto"],
)
def test_fused_and_unfused_trajectories_agree(tmp_path, method, overrides):
    common = [*overrides, "train.max_steps=8", "data.max_rows=64"]
    _, _, fused = _train(method, tmp_path / "fused", *common, "train.fused=true")
    _, _, unfused = _train(method, tmp_path / "unfused", *common, "train.fused=false")
    assert sorted(fused) == sorted(unfused)
    for s in fused:
        assert fused[s] == pytest.approx(unfused[s], rel=2e-4, abs=2e-5), (
            f"step {s}: {fused[s]} vs {unfused[s]}"
        )


def test_packed_and_padded_batches_give_the_same_losses(tmp_path):
    common = ["dpo.loss_type=sigmoid", "train.max_steps=4", "data.max_rows=64"]
    _, _, padded = _train("dpo", tmp_path / "padded", *common)
    _, _, packed = _train("dpo", tmp_path / "packed", *common, "data.packing=true")
    for s in padded:
        assert packed[s] == pytest.approx(padded[s], rel=1e-4, abs=1e-5)


def test_export_reloads_in_plain_transformers(tmp_path):
    from helpers import assert_same_float32_function, float64_truth
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def same_function(name, reloaded, live):  # logits of scale ~15: no fixed atol, the live model in float64
        truth = float64_truth(live)(ids).logits
        assert_same_float32_function(name, reloaded(ids).logits, live(ids).logits, truth)

    task, _, _ = _train("dpo", tmp_path / "dpo", "train.max_steps=3", "train.export=true")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "final")
    ids = torch.tensor([[1, 400, 30, 52, 9, 77]])
    task.model.eval()
    with torch.no_grad():
        same_function("dpo export", reloaded, task.model)
    assert (tmp_path / "dpo" / "final" / "model.safetensors").exists()

    task, _, _ = _train(
        "rm", tmp_path / "rm", "train.max_steps=3", "train.export=true", "train.export_dtype=bfloat16"
    )
    assert json.loads((tmp_path / "rm" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final", dtype=torch.float32)
    task.model.eval()
    with torch.no_grad():  # bf16 weights: the reload matches a bf16-rounded copy of the trained model
        for p in task.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        same_function("rm bfloat16 export", rm, task.model)
    task, _, _ = _train("rm", tmp_path / "rm32", "train.max_steps=3", "train.export=true")
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm32" / "final")
    task.model.eval()
    with torch.no_grad():
        same_function("rm float32 export", rm, task.model)


def _cli(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastalign.cli",
        "dpo",
        f"model.path={MODEL}",
        "model.dtype=float32",
        f"data.train={PANDALM}",
        "data.max_length=192",
        "data.max_prompt_length=96",
        "data.max_rows=200",
        f"train.output_dir={out}",
        "train.batch_size=16",
        "train.max_steps=24",
        "train.lr=2e-3",
        "train.save_every=2",
        "train.keep_last=2",
        "train.tensorboard=false",
        "train.export=false",
        "train.threads=1",
        "dpo.precompute_ref_logps=true",
        *extra,
    ]


def test_resume_after_sigkill_is_exact(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tmp_path / "full"), check=True, env=env, capture_output=True, timeout=600)
    full = _losses(tmp_path / "full")
    assert len(full) == 24

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "step-00000006"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended before its step-6 checkpoint"
    partial = _losses(out)
    assert max(partial) < 24, "the run finished before it was killed; nothing to resume"

    res = subprocess.run(_cli(out), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, 25))  # no step lost, none duplicated
    for s in range(1, 25):
        assert resumed[s] == full[s], f"step {s}: resumed {resumed[s]!r} != uninterrupted {full[s]!r}"
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_last


def test_cli_errors_name_the_key_and_the_file(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "fastalign.cli", "dpo", "train.lrr=1e-4"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "train.lrr" in res.stderr and "train.lr" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastalign.cli",
            "dpo",
            f"model.path={MODEL}",
            f"data.train={bad}",
            "data.strict=true",
            f"train.output_dir={tmp_path / 'out'}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert f"{bad}:2" in res.stderr, res.stderr


def test_resume_refuses_a_changed_data_order(tmp_path):
    """A checkpoint written with batch_size 8 cannot continue exactly with batch_size 4: clear error."""
    common = ["data.max_rows=32", "train.save_every=1", "train.resume=auto", "train.max_steps=2"]
    _train("sft", tmp_path, "data.format=sft", "data.columns.completion=chosen", *common)
    state = json.loads((tmp_path / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["micro_batches_done"] == 2 and state["batch_size"] == 8
    with pytest.raises(ValueError, match=r"train.batch_size: 8 -> 4"):
        _train("sft", tmp_path, "data.format=sft", "data.columns.completion=chosen", *common,
               "train.batch_size=4", "train.max_steps=4")  # fmt: skip


def test_soft_labels_from_ai_feedback(tmp_path):
    """p_chosen rows (`fastalign cai label`): p = 1 is exactly the hard-label run; p = 0.7 is
    exactly cDPO with label_smoothing 0.3 (DPO) / the BT cross-entropy at t = 0.7 (RM)."""
    rows = [json.loads(line) for line in PANDALM.read_text().splitlines()[:24]]
    files = {}
    for p in (1.0, 0.7):
        files[p] = tmp_path / f"soft{p}.jsonl"
        files[p].write_text("".join(json.dumps({**r, "p_chosen": p}) + "\n" for r in rows))
    common = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=0", "data.eval_fraction=0"]
    _, _, hard = _train("dpo", tmp_path / "hard", f"data.train={files[1.0]}", *common)
    _, _, soft1 = _train("dpo", tmp_path / "s1", f"data.train={files[1.0]}", "dpo.soft_labels=true", *common)
    _, _, cdpo = _train("dpo", tmp_path / "c", f"data.train={files[0.7]}", "dpo.label_smoothing=0.3", *common)
    _, _, soft7 = _train("dpo", tmp_path / "s7", f"data.train={files[0.7]}", "dpo.soft_labels=true", *common)
    assert soft1 == hard and soft7 == pytest.approx(cdpo, rel=1e-6) and soft7 != hard
    _, _, rm_hard = _train("rm", tmp_path / "rh", f"data.train={files[1.0]}", *common)
    _, _, rm_soft1 = _train("rm", tmp_path / "r1", f"data.train={files[1.0]}", "rm.soft_labels=true", *common)
    _, _, rm_soft7 = _train("rm", tmp_path / "r7", f"data.train={files[0.7]}", "rm.soft_labels=true", *common)
    assert rm_soft1 == pytest.approx(rm_hard, rel=1e-6)
    # first step, same weights: −0.7·logσ(d) − 0.3·logσ(−d) differs from −logσ(d) unless d = 0
    assert rm_soft7[1] != pytest.approx(rm_hard[1], rel=1e-4)
    with pytest.raises(ValueError, match="p_chosen"):
        _train("dpo", tmp_path / "x", "dpo.soft_labels=true", *common)
    with pytest.raises(ValueError, match="soft_labels"):
        _cfg("dpo", tmp_path / "y", "dpo.soft_labels=true", "dpo.loss_type=ipo")
