"""torchrun worker for tests/engine/test_fused_order.py: one SFT step's lm_head / embedding
gradient on a 2-rank ZeRO-3 engine, through `fastalign.engine.forward.fused_head_loss`, and what
happens when a caller computes the loss after the gathered head was released.

    torchrun --nproc_per_node 2 fused_order_worker.py OUT_DIR

Writes (rank 0) OUT_DIR/fused_order.pt {"grad": full gradient of the tied embedding through
fused_head_loss, "outside_error": the error of the loss computed outside the gather, or None}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _workload as W
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from fastalign.engine import build_ds_config, build_trainable, init_distributed, is_main_process, zero_init
from fastalign.engine.forward import fused_head_loss, shifted_hidden_states
from fastalign.engine.gather import fused_head_params
from fastalign.models import load_causal_lm, load_tokenizer
from fastalign.ops import linear_logprobs


def sft_loss(hidden, weight, bias, labels):
    logp = linear_logprobs(hidden, weight, labels, bias=bias)  # (B, T-1)
    mask = labels != W.IGNORE
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def main(out: Path) -> None:
    init_distributed()
    user = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    ds = build_ds_config(user, stage=3, batch_size=W.PAIRS_PER_RANK, grad_accum=1, max_grad_norm=None,
                         bf16=False, lr=W.LR, weight_decay=0.0, betas=(0.9, 0.999), world=2,
                         hidden_size=64)  # fmt: skip
    tok = load_tokenizer(str(W.MODEL))
    with zero_init(3, ds):
        model = load_causal_lm(str(W.MODEL), dtype="float32", attn_implementation="sdpa")
    opt, sched = W.make_optimizer(model)
    engine, _, _ = build_trainable(model, ds, opt, sched)
    b = W.batch(tok, W.rows(), 1, dist.get_rank())  # an SFT step: rank-specific rows
    labels = b["labels"][:, 1:]

    loss = fused_head_loss(engine, b, lambda h, w, bias: sft_loss(h, w, bias, labels))
    engine.backward(loss)
    head = engine.module.get_output_embeddings().weight
    grad = safe_get_full_grad(head).clone()
    engine.optimizer.zero_grad()

    # the wrong order: the head gathered and released, the loss computed afterwards
    outside_error = None
    hidden = shifted_hidden_states(engine, b)
    with fused_head_params(engine) as (w, bias):
        pass
    try:
        sft_loss(hidden, w, bias, labels)
    except RuntimeError as e:
        outside_error = str(e)[:300]
    if is_main_process():
        torch.save({"grad": grad, "outside_error": outside_error}, out / "fused_order.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
