"""Online / iterative DPO (Guo et al. 2024 "Direct Language Model Alignment from Online AI
Feedback"; Xiong et al. 2024 iterative DPO): DPO on the policy's own, freshly ranked samples.

Each iteration samples `online_dpo.num_samples` responses per prompt from the current policy,
scores them with the `RewardScorer` (reward models and / or a function), and makes one pair per
prompt: chosen = the best, rejected = the worst (a prompt whose samples all score the same gives no
pair). Then `epochs` × `minibatches` DPO steps (`FusedLinearPreferenceLoss`, `beta`, `loss_type`)
against the frozen reference (sequence log-probs at temperature 1, as in offline DPO).
`online_dpo.ref_refresh: true` copies the policy into the reference at the start of each
iteration (iterative DPO: each round is anchored at the previous round's policy).

Under a launcher each rank pairs its own prompts; a rank left with no pair in a minibatch runs a
dummy pair with weight 0, so every rank makes the same (collective) forward calls.
"""

from __future__ import annotations

from typing import Any

import torch

from fastalign.config import OnlineDPORecipe
from fastalign.data import PreferenceCollator
from fastalign.engine.forward import fused_head_loss, sequence_logps_of, shifted_labels
from fastalign.losses import FusedLinearPreferenceLoss
from fastalign.models import unwrap_model
from fastalign.rollout.experience import make_experience
from fastalign.trainers import rollout_loop as rl
from fastalign.trainers.runtime import update
from fastalign.trainers.setup import export_fn, setup_online


def best_worst_pairs(scores: torch.Tensor, k: int, tol: float = 1e-6) -> list[tuple[int, int]]:
    """(chosen row, rejected row) per group of `k` consecutive scores; groups whose max − min ≤ tol
    are skipped (no preference). Ties for best / worst take the first."""
    out = []
    for gi, grp in enumerate(scores.view(-1, k)):
        hi, lo = int(grp.argmax()), int(grp.argmin())
        if float(grp[hi] - grp[lo]) > tol:
            out.append((gi * k + hi, gi * k + lo))
    return out


def copy_weights(dst, src) -> None:
    """dst ← src for two models of one architecture (ZeRO-3: shard by shard, same partitioning)."""
    with torch.no_grad():
        for pd, ps in zip(unwrap_model(dst).parameters(), unwrap_model(src).parameters(), strict=True):
            if hasattr(pd, "ds_tensor"):
                pd.ds_tensor.copy_(ps.ds_tensor)
            else:
                pd.copy_(ps)


def _chunks(pairs: list, k: int) -> list[list]:
    """`k` chunks (some maybe empty) of `pairs`: every rank runs k minibatches."""
    base, extra = divmod(len(pairs), k)
    out, pos = [], 0
    for j in range(k):
        n = base + (1 if j < extra else 0)
        out.append(pairs[pos : pos + n])
        pos += n
    return out


def build(cfg: OnlineDPORecipe) -> rl.RolloutAlgo:
    o = cfg.online_dpo
    s = setup_online(cfg, "online-dpo", o.reference)
    iters = rl.total_iterations(cfg.train, len(s.prompts), s.rt.world)
    total = iters * o.epochs * o.minibatches
    policy = rl.make_trainable("policy", s.model, s.rt, cfg.train, total, cfg.train.lr)
    loss_mod = FusedLinearPreferenceLoss(
        "dpo", beta=o.beta, loss_type=o.loss_type, grad_filter=cfg.train.grad_filter
    )
    pad = s.tok.pad_token_id
    collate = PreferenceCollator(pad)
    seed = cfg.train.seed

    def dpo_step(examples: list[dict], real: bool) -> dict[str, Any]:
        batch = {k: v.to(s.device) if torch.is_tensor(v) else v for k, v in collate(examples).items()}
        with torch.no_grad():
            ref = sequence_logps_of(s.ref, batch, True, False)  # (2b,)
        b = ref.shape[0] // 2
        labels = shifted_labels(batch)
        loss, m = fused_head_loss(policy.fwd, batch, lambda h, w, bias: loss_mod(
            h, w, labels, bias=bias, ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:]
        ))  # fmt: skip
        gn = update(policy, loss if real else loss * 0.0)
        return {"loss": loss.detach(), "rewards/accuracies": m["accuracy"], "rewards/margins": m["margin"],
                "grad_norm": gn}  # fmt: skip

    def iteration(it: int, rows: list[dict]) -> dict[str, float]:
        if o.ref_refresh:
            copy_weights(s.ref, policy.fwd)
        grouped = [r for r in rows for _ in range(o.num_samples)]
        exp = make_experience(
            policy.fwd, s.tok, grouped, cfg.generation, s.scorer, ref=s.ref,
            seed=rl.generation_seed(seed, it, s.rt.rank), device=s.device,
        )  # fmt: skip
        pairs = best_worst_pairs(exp.scores.cpu(), o.num_samples)
        examples = [
            {"index": j, "prompt_ids": list(grouped[c]["prompt_ids"]),
             "chosen_ids": exp.response_ids[c], "rejected_ids": exp.response_ids[r]}
            for j, (c, r) in enumerate(pairs)
        ]  # fmt: skip
        dummy = {"index": 0, "prompt_ids": list(grouped[0]["prompt_ids"]),
                 "chosen_ids": exp.response_ids[0], "rejected_ids": exp.response_ids[0]}  # fmt: skip
        acc: list[dict[str, Any]] = []
        for epoch in range(o.epochs):
            order = torch.randperm(
                len(examples), generator=torch.Generator().manual_seed(seed + 7919 * it + epoch)
            )
            for chunk in _chunks([examples[i] for i in order.tolist()], o.minibatches):
                m = dpo_step(chunk or [dummy], bool(chunk))
                if chunk:
                    acc.append(m)
        metrics = {**exp.metrics, "online_dpo/pair_rate": len(pairs) / max(1, len(rows)), "lr": policy.lr}
        # the same keys on every rank (the mean over ranks is one all-reduce of a fixed key list)
        empty = {"loss": 0.0, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "grad_norm": 0.0}
        metrics.update(rl.mean_metrics(acc) if acc else empty)
        return metrics

    return rl.RolloutAlgo(
        name="online-dpo",
        rt=s.rt,
        trainables=[policy],
        prompts=s.prompts,
        iteration=iteration,
        watch=s.watch,
        state={"scorer": s.scorer, "watch": s.watch},
        export=export_fn(s.model, s.tok, s.rt),
    )
