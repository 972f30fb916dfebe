"""torchrun worker for tests/engine/test_zero3.py: the `_workload` steps on a ZeRO-3 engine.

    torchrun --nproc_per_node 2 zero3_worker.py OUT_DIR train    # all steps, checkpoint, export
    torchrun --nproc_per_node 2 zero3_worker.py OUT_DIR resume   # load the checkpoint, replay the rest

Writes (rank 0) OUT_DIR/<mode>.pt {losses, grads, logits}, (every rank) OUT_DIR/partition_<rank>.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import _workload as W
import torch
import torch.distributed as dist

from fastalign.engine import (
    build_ds_config,
    build_frozen,
    build_trainable,
    export_hf,
    fused_head_params,
    hidden_states,
    init_distributed,
    is_main_process,
    rank,
    world_size,
    zero_init,
)
from fastalign.models import load_causal_lm, load_tokenizer


def partition_report(model) -> dict:
    return {
        n: {"ds_numel": p.ds_numel, "local": p.ds_tensor.numel(), "numel": p.numel()}
        for n, p in model.named_parameters()
    }


def main(out: Path, mode: str) -> None:
    init_distributed()
    assert world_size() == W.WORLD, world_size()
    user = {"zero_optimization": {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto"}}
    ds = build_ds_config(
        user,
        stage=3,
        batch_size=W.PAIRS_PER_RANK,
        grad_accum=1,
        max_grad_norm=W.MAX_GRAD_NORM,
        bf16=False,
        lr=W.LR,
        weight_decay=W.WEIGHT_DECAY,
        betas=(0.9, 0.999),
        world=world_size(),
        hidden_size=64,
    )
    tok = load_tokenizer(str(W.MODEL))
    with zero_init(3, ds):
        model = load_causal_lm(str(W.MODEL), dtype="float32", attn_implementation="sdpa")
        ref = load_causal_lm(str(W.MODEL), dtype="float32", attn_implementation="sdpa")
    loaded = partition_report(model)  # before deepspeed.initialize: built sharded
    opt, sched = W.make_optimizer(model)
    engine, _, _ = build_trainable(model, ds, opt, sched)
    frozen = build_frozen(ref, ds)
    if mode == "resume":
        path, _ = engine.load_checkpoint(str(out / "ckpt"), tag="step2")
        assert path is not None, "checkpoint not found"
    data = W.rows()
    first = W.SAVE_AFTER if mode == "resume" else 0
    losses, grads = [], []
    for step in range(first, len(W.STEPS)):
        kind = W.STEPS[step]
        b = W.batch(tok, data, step, rank())
        h = hidden_states(engine, b["input_ids"], b["attention_mask"])
        rh = None
        if kind == "dpo":
            with torch.no_grad():
                rh = hidden_states(frozen, b["input_ids"], b["attention_mask"])
        with fused_head_params(engine) as (w, _), fused_head_params(frozen) as (rw, _):
            loss = W.step_loss(kind, h, w, b, rh, rw)
        engine.backward(loss)
        if mode == "train":
            from deepspeed.utils import safe_get_full_grad

            grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world_size())
        if mode == "train" and step + 1 == W.SAVE_AFTER:
            engine.save_checkpoint(str(out / "ckpt"), tag="step2")
    after = partition_report(engine.module)
    (out / f"partition_{rank()}.json").write_text(json.dumps({"loaded": loaded, "after": after}))

    logits = None
    if mode == "train":
        export_hf(engine, tok, out / "hf", dtype="float32")
        b = W.batch(tok, data, 0, 0)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    if is_main_process():
        torch.save({"losses": losses, "grads": grads, "logits": logits}, out / f"{mode}.pt")
    dist.barrier()
    assert all(math.isfinite(x) for x in losses)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
