"""2-rank ZeRO-3 (torchrun, gloo, CPU) against a single-process run of the same steps.

One training launch (fused DPO / SFT steps, checkpoint after step 2, HF export) and one resume
launch; the single-process replay (`_workload.reference_run`) runs in this process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from launching import dist_env, free_port, run_launch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
LAUNCH_TIMEOUT_S = 420


def _launch(out: Path, mode: str) -> None:
    env = dist_env(debug=False, pythonpath=(HERE, REPO))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port())]
    proc = run_launch(
        [*cmd, str(HERE / "zero3_worker.py"), str(out), mode], env=env, timeout=LAUNCH_TIMEOUT_S
    )
    assert proc.returncode == 0, f"torchrun {mode} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import _workload as W

    out = tmp_path_factory.mktemp("zero3")
    _launch(out, "train")
    _launch(out, "resume")
    return {
        "out": out,
        "train": torch.load(out / "train.pt"),
        "resume": torch.load(out / "resume.pt"),
        "ref": W.reference_run(),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def test_every_rank_holds_half_of_every_parameter(runs):
    for r in range(2):
        report = json.loads((runs["out"] / f"partition_{r}.json").read_text())
        for when in ("loaded", "after"):
            for name, p in report[when].items():
                assert p["local"] == math.ceil(p["ds_numel"] / 2), (r, when, name, p)
                assert p["numel"] == 0, f"rank {r} holds a full copy of {name} ({when})"


def test_gradients_equal_single_process(runs):
    """Step 0 (same weights on both sides): every parameter's consolidated gradient within 1e-5 rel,
    the tied embedding / lm_head included. Later steps follow AdamW from weights that differ by
    float rounding, which Adam's 1/sqrt(v) amplifies for near-zero gradients: 1e-3 there."""
    got, ref = runs["train"]["grads"], runs["ref"]["grads"]
    assert len(got) == len(ref)
    assert set(got[0]) == set(ref[0])
    for step, (g, r) in enumerate(zip(got, ref, strict=True)):
        tol = 1e-5 if step == 0 else 1e-3
        for name in r:
            assert _rel(g[name], r[name]) <= tol, (step, name, _rel(g[name], r[name]))


def test_losses_equal_single_process(runs):
    got, ref = runs["train"]["losses"], runs["ref"]["losses"]
    assert len(got) == len(ref)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-7, (step, a, b)
    assert got[0] == pytest.approx(math.log(2), rel=1e-6)  # DPO with reference == policy


def test_resume_gives_the_same_next_losses(runs):
    import _workload as W

    resumed, full = runs["resume"]["losses"], runs["train"]["losses"][W.SAVE_AFTER :]
    assert len(resumed) == len(full) > 0
    for a, b in zip(resumed, full, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (resumed, full)


def test_export_loads_in_plain_transformers(runs):
    import _workload as W
    from transformers import AutoModelForCausalLM

    folder = runs["out"] / "hf"
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    tok = runs["ref"]["tokenizer"]
    b = W.batch(tok, W.rows(), 0, 0)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref_model = runs["ref"]["model"].eval()
        ref_logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(logits, runs["train"]["logits"])  # same weights, same kernels: bit-exact
    assert _rel(logits, ref_logits) <= 1e-3  # the single-process run trained to the same weights
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
