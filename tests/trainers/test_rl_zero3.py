"""PPO under `torchrun --nproc_per_node 2` with DeepSpeed ZeRO-3 (gloo, CPU) and all four models:
policy and a separate value model (trainable engines), reference and a stories260k reward model
(frozen sharded engines) — against a one-process run of the same global batch.

Why the metrics can match: generation is greedy (do_sample=false, so the samples do not depend on
the rank's RNG or batch mates), no response ends early (every row has max_new_tokens tokens), so
each rank's token-mean loss over its 2 rows is half of the global token-mean over 4 rows and
DeepSpeed's gradient average equals the one-process gradient; advantage whitening uses global
sums; logged metrics are row-weighted means over ranks. What remains is float summation order
(sharded all-gathers, reduce-scatter of gradients): ~1e-6 relative per step, so iteration 1
(rollout before any update) must agree to 1e-4 and iteration 2 (after one PPO update of both
models) to 1e-3 relative.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from launching import dist_env, free_port, run_launch
from repo_assets import ASSETS

ROOT = Path(__file__).resolve().parents[2]
MODEL = ASSETS / "models" / "stories260k"

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
LAUNCH_TIMEOUT_S = 480
ITERS = 2
STARTS = ["Once upon a time", "Lily went to the park", "Tom had a big red ball", "The cat sat on the mat"]


def _overrides(out: Path, prompts: Path, batch_size: int) -> list[str]:
    return [
        f"model.path={MODEL}", f"data.train={prompts}", f"train.output_dir={out}",
        f"train.max_steps={ITERS}", f"train.batch_size={batch_size}", "train.save_every=1",
        "train.tensorboard=false", "train.progress=false", "train.resume=never", "train.export=false",
        "generation.do_sample=false", "generation.max_new_tokens=8",
        f"reward.models=[{MODEL}]", "reward.function_weight=1.0", "ppo.epochs=1", "ppo.minibatches=1",
        "ppo.value_model=separate", f"ppo.value_path={MODEL}",
    ]  # fmt: skip


def _run(cmd: list[str], what: str) -> str:
    proc = run_launch(cmd, env=dist_env(), timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_zero3")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in STARTS))
    ds_json = tmp / "ds.json"  # partition every parameter (the default keeps small ones whole)
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    two += [
        "-m",
        "fastalign.cli",
        "ppo",
        "--config",
        "configs/ppo.yaml",
        *_overrides(tmp / "two", prompts, 2),
    ]
    two += ["engine.backend=deepspeed", f"engine.ds_config={ds_json}"]
    log = _run(two, "torchrun ppo")
    one = [sys.executable, "-m", "fastalign.cli", "ppo", "--config", "configs/ppo.yaml"]
    one += [*_overrides(tmp / "one", prompts, 4), "engine.backend=none"]
    _run(one, "one-process ppo")
    return {"two": tmp / "two", "one": tmp / "one", "log": log}


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_two_rank_ppo_matches_one_process(runs):
    two, one = _metrics(runs["two"]), _metrics(runs["one"])
    assert len(two) == len(one) == ITERS
    assert two[0]["response/length"] == one[0]["response/length"] == 8.0
    keys = (
        "reward/mean",
        "reward/std",
        "reward/model_mean",
        "kl",
        "entropy",
        "loss",
        "value/loss",
        "policy/approx_kl",
    )
    for it, tol in ((0, 1e-4), (1, 1e-3)):
        for k in keys:
            a, b = two[it][k], one[it][k]
            assert abs(a - b) <= tol * max(1.0, abs(b)), (it, k, a, b)
    assert two[0]["kl"] == 0.0 and abs(two[1]["kl"]) > 0  # the update moved the policy off the reference


def test_two_rank_checkpoints_hold_both_trainables(runs):
    ckpt = runs["two"] / "checkpoints" / f"step-{ITERS:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == ITERS and state["world_size"] == 2
    assert (ckpt / "policy").is_dir() and (ckpt / "value").is_dir() and (ckpt / "extra_state.pt").is_file()
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert "[rank 1/2] ZeRO-3 policy" in runs["log"]
