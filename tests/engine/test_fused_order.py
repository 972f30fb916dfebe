"""The fused-head order under ZeRO-3 (2 ranks, gloo): `fused_head_loss` gives the lm_head (tied
embedding) the gradient of a single process, and a loss computed after the gathered head is
released fails loudly instead of training on freed storage. Together with tests/test_layers.py
(no module but engine/forward.py gathers the head), a recipe cannot get the order wrong."""

from __future__ import annotations

import importlib.util
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


def _single_process_grad() -> torch.Tensor:
    """Mean over the two ranks' batches of the SFT loss gradient of the (tied) head, no ZeRO."""
    import _workload as W
    from fused_order_worker import sft_loss

    from fastalign.engine.forward import fused_head_loss
    from fastalign.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(W.MODEL))
    model = load_causal_lm(str(W.MODEL), dtype="float32", attn_implementation="sdpa")
    data = W.rows()
    for rank in range(2):
        b = W.batch(tok, data, 1, rank)
        labels = b["labels"][:, 1:]
        loss = fused_head_loss(model, b, lambda h, w, bias, labels=labels: sft_loss(h, w, bias, labels))
        (loss / 2).backward()
    return model.get_output_embeddings().weight.grad.clone()


def test_fused_head_loss_under_zero3_equals_one_process(tmp_path):
    env = dist_env(debug=False, pythonpath=(HERE, REPO))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    proc = run_launch([*cmd, str(HERE / "fused_order_worker.py"), str(tmp_path)], env=env, timeout=420)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    got = torch.load(tmp_path / "fused_order.pt")
    want = _single_process_grad()
    assert got["grad"].shape == want.shape
    err = (got["grad"] - want).abs().max().item() / want.abs().max().item()
    assert err <= 1e-5, err
    assert got["outside_error"] is not None, (
        "a loss computed after the gather must fail, not read freed storage"
    )
