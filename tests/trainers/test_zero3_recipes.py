"""The unchanged recipes under a launcher: `torchrun --nproc_per_node 2 -m fastalign.cli sft|dpo`
with DeepSpeed ZeRO-3 (gloo, CPU) against a one-process run of the same global batches.

Rank r trains on rows [r·b, (r+1)·b) of each global micro-batch of 2·b rows, so the 2-rank run
sees the micro-batches 2j, 2j+1 of a one-process run with `batch_size=b, grad_accum=2`: the
logged loss (mean over ranks) and the update (DeepSpeed averages the ranks' gradients) match it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from launching import dist_env, free_port, run_launch
from repo_assets import ASSETS

ROOT = Path(__file__).resolve().parents[2]
MODEL = ASSETS / "models" / "stories260k"
OASST = ASSETS / "data" / "preferences" / "oasst_en_100_tree_pairs.jsonl"

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
LAUNCH_TIMEOUT_S = 420
STEPS = 4


def _overrides(method: str, out: Path) -> list[str]:
    common = [
        f"model.path={MODEL}",
        f"data.train={OASST}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        f"train.output_dir={out}",
        f"train.max_steps={STEPS}",
        "train.batch_size=2",
        "train.eval_every=0",
        "train.save_every=2",
        "train.tensorboard=false",
        "train.progress=false",
        "train.resume=never",
    ]
    return [*common, "train.export=true"] if method == "sft" else [*common, "train.export=false"]


def _run(cmd: list[str], what: str) -> str:
    proc = run_launch(cmd, env=dist_env(), timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stderr


def _launch(method: str, out: Path, ds_json: Path, *extra: str, launcher: str = "torchrun") -> str:
    """2 ranks on CPU via `torchrun -m` or `deepspeed --num_gpus 2 --module` (DS_ACCELERATOR=cpu)."""
    exe = str(Path(sys.executable).with_name(launcher))
    if launcher == "torchrun":
        cmd = [exe, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        cmd += ["-m", "fastalign.cli"]
    else:
        cmd = [exe, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "fastalign.cli"]
    cmd += [method, "--config", f"configs/{method}.yaml"]
    cmd += [*_overrides(method, out), "engine.backend=deepspeed", f"engine.ds_config={ds_json}", *extra]
    return _run(cmd, f"{launcher} {method}")


def _single(method: str, out: Path) -> str:
    cmd = [sys.executable, "-m", "fastalign.cli", method, "--config", f"configs/{method}.yaml"]
    cmd += [*_overrides(method, out), "train.grad_accum=2", "engine.backend=none"]
    return _run(cmd, f"one-process {method}")


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module", params=["sft", "dpo"])
def runs(request, tmp_path_factory):
    method = request.param
    tmp = tmp_path_factory.mktemp(f"zero3_{method}")
    ds_json = tmp / "ds.json"  # partition every parameter (the default keeps small ones whole)
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    log = _launch(method, tmp / "two", ds_json)
    _single(method, tmp / "one")
    resumed = None
    if method == "dpo":  # 2 ranks resume from the step-2 checkpoint, under the deepspeed launcher
        resumed = tmp / "resumed"
        shutil.copytree(tmp / "two", resumed)
        shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
        _launch(method, resumed, ds_json, "train.resume=auto", launcher="deepspeed")
    return {"method": method, "two": tmp / "two", "one": tmp / "one", "log": log, "resumed": resumed}


def test_losses_match_one_process_with_the_same_global_batch(runs):
    two, one = _train_losses(runs["two"]), _train_losses(runs["one"])
    assert len(two) == len(one) == STEPS
    for step, (a, b) in enumerate(zip(two, one, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), (runs["method"], step, two, one)
    assert len(set(two)) > 1  # the model trains: the batches and losses change step to step
    if runs["method"] == "dpo":
        assert abs(two[0] - 0.6931471805599453) <= 1e-6  # the reference is the initial policy


def test_two_rank_resume_gives_the_same_next_losses(runs):
    if runs["resumed"] is None:
        pytest.skip("resume is checked on the DPO run only (one more launch)")
    assert _train_losses(runs["resumed"]) == _train_losses(runs["two"])


def test_every_rank_holds_half_of_the_policy(runs):
    found = re.findall(r"\[rank (\d)/2\] ZeRO-3 policy: this rank holds (\d+)/(\d+) parameter", runs["log"])
    assert sorted(int(r) for r, _, _ in found) == [0, 1], runs["log"][-3000:]
    for _, held, total in found:
        assert abs(int(held) / int(total) - 0.5) <= 0.01, (held, total)


def test_rank_zero_writes_logs_checkpoints_and_export(runs):
    out = runs["two"]
    assert (out / "config.yaml").is_file()
    ckpt = out / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert (ckpt / "policy").is_dir() and sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
    assert not list((out / "checkpoints").glob("*.tmp"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"split": "train"' in x]) == STEPS  # one writer, no duplicates
    if runs["method"] == "sft":  # consolidated export loads in plain transformers
        import torch
        from transformers import AutoModelForCausalLM

        a = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(runs["one"] / "final", dtype=torch.float32)
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert (p - q).abs().max().item() <= 1e-4 * max(1.0, q.abs().max().item()), name


def test_rank_slices_are_disjoint_and_cover_the_global_batch():
    from fastalign.trainers.runtime import ZeroRuntime

    def slices(rows, b, world=2):
        out = []
        for r in range(world):
            rt = ZeroRuntime.__new__(ZeroRuntime)
            rt.rank, rt.world = r, world
            out.append(rt.rows_of(rows, b))
        return out

    assert slices(list(range(8)), 4) == [([0, 1, 2, 3], True), ([4, 5, 6, 7], True)]
    assert slices([5, 6, 7], 2) == [([5, 6], True), ([7], True)]  # short last batch: as even as possible
    assert slices([9], 2) == [([9], True), ([9], False)]  # a rank with no row pads, weight 0


def test_engine_section_validates_and_the_shipped_ds_json_fills():
    from fastalign.config import SFTRecipe, load_config
    from fastalign.engine import build_ds_config

    cfg = load_config(SFTRecipe, None, ["engine.zero_stage=3", "engine.offload_param=cpu"])
    assert cfg.engine.backend == "auto" and cfg.engine.offload_param == "cpu"
    with pytest.raises(ValueError, match=r"engine\.offload_param.*zero_stage 3"):
        load_config(SFTRecipe, None, ["engine.zero_stage=2", "engine.offload_param=cpu"])
    with pytest.raises(ValueError, match=r"engine\.zero_stage"):
        load_config(SFTRecipe, None, ["engine.zero_stage=4"])
    with pytest.raises(ValueError, match=r"engine\.ds_config.*does not exist"):
        load_config(SFTRecipe, None, ["engine.ds_config=/nonexistent/ds.json"])
    ds = build_ds_config(
        str(ROOT / "configs" / "zero3.json"), stage=3, batch_size=2, grad_accum=3, max_grad_norm=1.0,
        bf16=False, lr=1e-3, weight_decay=0.0, world=2, hidden_size=64,
    )  # fmt: skip
    assert ds["train_batch_size"] == 12 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640
