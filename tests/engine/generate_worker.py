"""torchrun worker for tests/engine/test_generate_zero3.py: `generate` on ZeRO-3 engines.

    torchrun --nproc_per_node 2 generate_worker.py OUT_DIR

stories260k is built sharded (`zero_init`, stage3_param_persistence_threshold 0: every parameter
is partitioned) as a frozen engine and as a trainable one. Rank 0 holds 3 prompts, rank 1 one
(batch_size 2: 2 generate calls vs 1) — and in the "*_empty" cases rank 1 holds none. Each rank
writes OUT_DIR/rank<r>.json {case: {response_ids, finished, sharded_after}} plus "train_loss".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

MODEL = Path(__file__).resolve().parents[2] / "assets" / "models" / "stories260k"
PROMPTS = ["Once upon a time", "The cat", "Lily went to the park and saw", "One day, a little boy"]
N_NEW = 16
BATCH = 2
SEED = 7


def rank_prompts(tok, rank: int, empty_rank1: bool = False) -> list[list[int]]:
    """Rank 0: prompts 0-2; rank 1: prompt 3 (or nothing)."""
    ids = [tok(t).input_ids for t in PROMPTS]
    if rank == 0:
        return ids[:3]
    return [] if empty_rank1 else ids[3:]


def eos_ids(tok) -> list[int]:
    """EOS plus "." so rows finish at different steps (ranks stop at different times)."""
    return [tok.eos_token_id, tok("Lily.", add_special_tokens=False).input_ids[-1]]


def gen_config(mode: str, sample: bool = False):
    from fastalign.config import GenerationConfig

    return GenerationConfig(max_new_tokens=N_NEW, do_sample=sample, batch_size=BATCH, zero_mode=mode)


def _all_sharded(engine) -> bool:
    return all(p.numel() == 0 for p in engine.module.parameters())


def main(out: Path) -> None:
    from fastalign.engine import (
        build_ds_config,
        build_frozen,
        build_trainable,
        init_distributed,
        rank,
        zero_init,
    )
    from fastalign.models import load_causal_lm, load_tokenizer
    from fastalign.rollout.generate import generate

    init_distributed()
    user = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    ds = build_ds_config(
        user, stage=3, batch_size=1, grad_accum=1, max_grad_norm=1.0, bf16=False, lr=1e-3,
        weight_decay=0.0, betas=(0.9, 0.999), world=2, hidden_size=64,
    )  # fmt: skip
    tok = load_tokenizer(str(MODEL))
    with zero_init(3, ds):
        frozen_model = load_causal_lm(str(MODEL), dtype="float32", attn_implementation="sdpa")
        policy = load_causal_lm(str(MODEL), dtype="float32", attn_implementation="sdpa")
    frozen = build_frozen(frozen_model, ds)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, foreach=False)
    engine, _, _ = build_trainable(policy, ds, opt)
    r, eos = rank(), eos_ids(tok)
    res: dict = {}

    def run(case: str, model, mode: str, *, empty: bool = False, sample: bool = False) -> None:
        g = generate(
            model, tok, rank_prompts(tok, r, empty), gen_config(mode, sample),
            seed=SEED if sample else None, eos_token_ids=eos,
        )  # fmt: skip
        sharded = _all_sharded(model)
        res[case] = {"response_ids": g.response_ids, "finished": g.finished, "sharded_after": sharded}

    run("gather", frozen, "gather")
    run("synced", frozen, "synced")
    run("auto", frozen, "auto")
    run("gather_empty", frozen, "gather", empty=True)
    run("synced_empty", frozen, "synced", empty=True)
    run("sample_gather", frozen, "gather", sample=True)
    run("sample_synced", frozen, "synced", sample=True)
    try:  # engine.module still carries the engine's hooks, which generate cannot detach from there
        generate(frozen.module, tok, rank_prompts(tok, r), gen_config("gather"))
        res["bare_module_error"] = None
    except ValueError as e:
        res["bare_module_error"] = str(e)
    run("train_gather", engine, "gather")  # trainable engine: hooks live on its stage-3 optimizer
    res["train_mode_restored"] = engine.training
    # the ZeRO-3 hooks must be back: a normal training step after generation
    ids = torch.tensor([rank_prompts(tok, r)[0]])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    res["train_loss"] = loss.item()
    res["train_sharded_after_step"] = _all_sharded(engine)
    run("train_synced_after_step", engine, "synced")
    (out / f"rank{r}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    assert math.isfinite(res["train_loss"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
