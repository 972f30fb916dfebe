"""ZeRO-3 options beyond the fp32 default, on 2 CPU ranks (gloo) with stories260k: CPU optimizer
offload (DeepSpeedCPUAdam, JIT-built into TORCH_EXTENSIONS_DIR), parameter offload, bf16 mixed
precision, the export dtype, and DPO with a frozen bf16 reference engine.

Two kinds of launch, each once per module:
- the recipes through `torchrun -m fastalign.cli sft|dpo` (losses against the fp32 2-rank run);
- this file as a torchrun worker (`python test_zero3_options.py OUT`): engines built directly, so
  the engine's own logits can be compared with the exported folder reloaded in plain transformers
  in the same process (same threads: bit-equality is meaningful).

Tolerances. Offload runs the same AdamW update in DeepSpeed's C++ CPU Adam (fp32, fused ops in
another order than torch's foreach AdamW): after 4 steps the losses agree to ~4e-7 relative, so
1e-5 leaves margin yet catches any change in the maths (a missing bias correction or a weight decay
on the wrong parameters moves them by > 1e-4). bf16 rounds weights and activations to 8 bits of
mantissa (~4e-3 relative each): 2e-2 relative on these few steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
from launching import dist_env, free_port, run_launch
from repo_assets import ASSETS

ROOT = Path(__file__).resolve().parents[2]
MODEL = ASSETS / "models" / "stories260k"
OASST = ASSETS / "data" / "preferences" / "oasst_en_100_tree_pairs.jsonl"
LAUNCH_TIMEOUT_S = 600  # a clean machine JIT-builds cpu_adam (~45 s on 2 cores) and the shm op (~50 s)
STEPS = 4
WALL: dict[str, float] = {}  # launch -> seconds, printed at the end of the module

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


def _torchrun(args: list[str], what: str) -> str:
    exe = str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        exe,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]
    t0 = time.perf_counter()
    env = dist_env(debug=False, pythonpath=(ROOT, ROOT / "tests"))
    proc = run_launch(cmd, env=env, timeout=LAUNCH_TIMEOUT_S)
    WALL[what] = time.perf_counter() - t0
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stderr


def _recipe(method: str, out: Path, ds_json: Path, *extra: str) -> str:
    args = ["-m", "fastalign.cli", method, "--config", f"configs/{method}.yaml"]
    args += [f"model.path={MODEL}", f"data.train={OASST}", "data.max_length=64", "data.max_prompt_length=32"]
    args += [f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.batch_size=2"]
    args += ["train.eval_every=0", "train.save_every=0", "train.tensorboard=false", "train.progress=false"]
    args += ["train.resume=never"]
    args += ["engine.backend=deepspeed", f"engine.ds_config={ds_json}", *extra]
    return _torchrun(args, f"{method} {' '.join(extra)}")


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3_options")
    ds_json = tmp / "ds.json"  # partition every parameter (the default keeps small ones whole)
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    bf16, no_export = "train.mixed_precision=bf16", "train.export=false"
    runs = {
        "fp32": ("sft", ["train.export=true", "train.export_dtype=float32"]),
        "offload_all": ("sft", [no_export, "engine.offload_optimizer=cpu", "engine.offload_param=cpu"]),
        "bf16": ("sft", [bf16, "train.export=true", "train.export_dtype=bfloat16"]),
        "dpo_bf16": ("dpo", [bf16, no_export, "dpo.precompute_ref_logps=false"]),
    }
    logs = {name: _recipe(method, tmp / name, ds_json, *extra) for name, (method, extra) in runs.items()}
    yield {"dir": tmp, "log": logs}
    print("\nlaunch wall times (s): " + ", ".join(f"{k}: {v:.1f}" for k, v in WALL.items()), file=sys.stderr)


def test_cpu_offload_gives_the_losses_of_the_plain_zero3_run(recipes):
    """Optimizer + parameter offload through the recipe (optimizer offload alone, with weight
    decay groups, is the engine worker's "offload" run)."""
    run = "offload_all"
    ref, got = _train_losses(recipes["dir"] / "fp32"), _train_losses(recipes["dir"] / run)
    assert len(got) == len(ref) == STEPS
    assert len(set(ref)) == STEPS  # the model trains: a wrong update would show from step 2 on
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert _rel(a, b) <= 1e-5, (run, step, got, ref)


def test_bf16_training_is_close_to_fp32_and_exports_bfloat16(recipes):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref, got = _train_losses(recipes["dir"] / "fp32"), _train_losses(recipes["dir"] / "bf16")
    assert len(got) == STEPS and all(math.isfinite(x) for x in got)
    assert got != ref  # bf16 really ran (the fp32 run's losses are not reproduced to the bit)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert _rel(a, b) <= 2e-2, (step, got, ref)
    final = recipes["dir"] / "bf16" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with safe_open(str(recipes["dir"] / "fp32" / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_dpo_with_a_frozen_bf16_reference_engine(recipes):
    losses = _train_losses(recipes["dir"] / "dpo_bf16")
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2)) <= 1e-5  # the frozen reference is the initial policy
    assert len(set(losses)) == STEPS
    assert not (recipes["dir"] / "dpo_bf16" / "ref_logps.safetensors").exists()  # scored every step


# ---- engine-level launch: export dtypes against the engine's own logits --------------------------

WORKER_STEPS = 3
LR, WEIGHT_DECAY = 1e-3, 0.1  # weight decay on matrices only, as the recipes group it


def _worker_batch(step: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(3, 512, (2, 24), generator=g)  # (B, T) in stories260k's vocabulary
    return ids, ids.clone()


def _engine_run(tag: str, out: Path, *, bf16: bool, offload: bool, exports: tuple[str | None, ...]) -> dict:
    """Build a ZeRO-3 engine, train WORKER_STEPS steps, take its logits, export; every rank."""
    import torch
    import torch.distributed as dist

    from fastalign.engine import build_ds_config, build_trainable, export_hf, rank, world_size, zero_init
    from fastalign.models import load_causal_lm, load_tokenizer

    ds = build_ds_config(
        {"zero_optimization": {"stage3_param_persistence_threshold": 0}}, stage=3, batch_size=2,
        grad_accum=1, max_grad_norm=1.0, bf16=bf16, offload_optimizer="cpu" if offload else "none",
        lr=LR, weight_decay=WEIGHT_DECAY, world=world_size(), hidden_size=64,
    )  # fmt: skip
    with zero_init(3, ds):
        model = load_causal_lm(str(MODEL), dtype="float32", attn_implementation="sdpa")
    decay = [p for p in model.parameters() if len(p.ds_shape) >= 2]
    no_decay = [p for p in model.parameters() if len(p.ds_shape) < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine, _, _ = build_trainable(model, ds, opt, sched)
    losses = []
    for step in range(WORKER_STEPS):
        ids, labels = _worker_batch(step, rank())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world_size())
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=_worker_batch(99, 0)[0]).logits.float()  # (B, T, V), no autocast
    tok = load_tokenizer(str(MODEL))
    dirs = {str(d): str(export_hf(engine, tok, out / f"{tag}_{d}", dtype=d)) for d in exports}
    return {"losses": losses, "logits": logits, "exports": dirs}


def _reload_logits(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = model(input_ids=_worker_batch(99, 0)[0]).logits.float()
    return {"logits": logits, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "state": {k: v.clone() for k, v in model.state_dict().items()}}  # fmt: skip


def worker_main(out: Path) -> None:
    import torch

    from fastalign.engine import barrier, init_distributed, is_main_process

    init_distributed()
    res = {
        "fp32": _engine_run("fp32", out, bf16=False, offload=False, exports=("float32",)),
        "offload": _engine_run("offload", out, bf16=False, offload=True, exports=()),
        "bf16": _engine_run("bf16", out, bf16=True, offload=False, exports=(None, "float32", "bfloat16")),
    }
    barrier()
    if is_main_process():  # reload with plain transformers, not sharded: forget the ZeRO-3 registration
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        for r in res.values():
            r["reloaded"] = {d: _reload_logits(folder) for d, folder in r.pop("exports").items()}
        torch.save(res, out / "worker.pt")
    barrier()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("zero3_options_worker")
    _torchrun([str(Path(__file__).resolve()), str(out)], "engine worker")
    return torch.load(out / "worker.pt", weights_only=False)


def test_offload_with_weight_decay_groups_matches_torch_adamw(worker):
    ref, got = worker["fp32"]["losses"], worker["offload"]["losses"]
    assert len(set(ref)) == WORKER_STEPS
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert _rel(a, b) <= 1e-5, (step, got, ref)


def test_float32_export_of_an_fp32_engine_gives_its_logits_bit_for_bit(worker):
    import torch

    r = worker["fp32"]
    back = r["reloaded"]["float32"]
    assert back["dtypes"] == ["torch.float32"]
    assert torch.equal(back["logits"], r["logits"])


def test_bf16_engine_exports_fp32_masters_or_bf16_rounded_weights(worker):
    import torch

    r = worker["bf16"]
    assert all(math.isfinite(x) for x in r["losses"])
    auto, f32, b16 = (r["reloaded"][k] for k in ("None", "float32", "bfloat16"))
    assert auto["dtypes"] == f32["dtypes"] == ["torch.float32"] and b16["dtypes"] == ["torch.bfloat16"]
    assert torch.equal(b16["logits"], r["logits"])  # the bf16 folder is the engine's bf16 weights
    n_off = 0
    for k, w in f32["state"].items():
        assert torch.equal(auto["state"][k], w), k  # auto under bf16 training = the fp32 masters
        assert torch.equal(w.to(torch.bfloat16), b16["state"][k]), k  # bf16 = masters rounded once
        n_off += int((w.to(torch.bfloat16).float() != w).sum())
    assert n_off > 0  # the fp32 export holds the masters, not bf16 weights widened to fp32
    assert (f32["logits"] - r["logits"]).abs().max() <= 5e-2 * r["logits"].abs().max()


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]))
