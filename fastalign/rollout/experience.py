"""Experience for the online recipes: prompts → samples → scores → one padded training batch.

    exp = make_experience(policy, tokenizer, rows, gen, scorer, ref=ref, seed=s)
    exp.batch["input_ids"]        (B, T)   right-padded prompt + response
    exp.mask                      (B, T-1) True on response tokens, aligned with hidden[:, :-1]
    exp.old_logps / exp.ref_logps (B, T-1) log_softmax(logits / temperature) of the taken tokens
    exp.scores                    (B,)     final rewards from the RewardScorer

Log-probs are recomputed at train time on the fused path (`linear_logprobs` on the last hidden
states, logits never materialised) with the SAME temperature as sampling — exactly what
`FusedLinearPolicyLoss(temperature=...)` computes in the update — so the PPO ratio starts at 1 for
the sampled tokens. The sampler's own log-probs (`Generations.logprobs`) equal these up to
rounding (tested); they are not used for the ratio, because the update must compare like with like
(same padding, same kernel). The reference model uses the same temperature, so the KL compares the
two sampling distributions.

`kl` in the metrics is always the mean over sequences of Σ_t (old_logp − ref_logp) over the
response (k1 per sequence, nats) whatever estimator the loss uses: one number the reward-hacking
watch and the adaptive controller can read across recipes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastalign.constants import IGNORE_INDEX
from fastalign.data.prompts import column_lists
from fastalign.engine.forward import token_logps as forward_token_logps
from fastalign.rollout.generate import generate


@dataclass
class Experience:
    """One rollout batch (this rank's rows)."""

    rows: list[dict]  # the prompt examples, one per sample (repeated for several samples per prompt)
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask (B, T); labels (B, T), -100 off-response
    mask: torch.Tensor  # (B, T-1) bool: response tokens in the shifted frame
    old_logps: torch.Tensor  # (B, T-1) policy at rollout, 0 off-response
    ref_logps: torch.Tensor | None  # (B, T-1) reference, 0 off-response
    entropy: torch.Tensor  # (B, T-1) policy entropy at rollout
    scores: torch.Tensor  # (B,) final rewards
    finished: torch.Tensor  # (B,) bool: ended by EOS / stop string
    lengths: torch.Tensor  # (B,) response tokens
    prompts: list[str]
    responses: list[str]
    response_ids: list[list[int]]  # generated tokens (EOS / stop kept)
    metrics: dict[str, float] = field(default_factory=dict)
    values: torch.Tensor | None = None  # (B, T-1) PPO critic at rollout

    def __len__(self) -> int:
        return len(self.rows)


def pad_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, device=None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response rows: input_ids, attention_mask, labels (-100 on the prompt
    and padding; the loop's convention, shifted by `fastalign.trainers.common.shifted_labels`)."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def shifted(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) labels aligned with hidden[:, :-1]."""
    return batch["labels"][:, 1:]


def token_logps(
    model, batch: dict[str, torch.Tensor], temperature: float, *, entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token log-probs (B, T-1) of the response tokens at `temperature` (0 elsewhere),
    plus the entropy (B, T-1) with `entropy=True`. Differentiable; call under no_grad for
    rollout quantities. `model` may be a DeepSpeed engine (ZeRO-3: collective)."""
    out = forward_token_logps(model, batch, fused=True, temperature=temperature, entropy=entropy)
    return (out[0], out[2]) if entropy else out[0]


def value_predictions(value_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) critic values of the states that predict each next token (ValueHeadModel or its
    DeepSpeed engine)."""
    values = value_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return values[:, :-1].float()


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t (logp − ref_logp) over each response: the k1 KL of the sequence, in nats."""
    return torch.where(mask, logps - ref_logps, 0.0).sum(-1)


def make_experience(
    policy,
    tokenizer,
    rows: Sequence[dict],
    gen,
    scorer,
    *,
    ref=None,
    seed: int | None = None,
    device: torch.device | None = None,
) -> Experience:
    """Sample one response per row of `rows` (repeat rows for several samples), score it and
    compute the rollout log-probs. `policy` / `ref`: models or DeepSpeed engines (ZeRO-3: every rank
    calls this together, with any number of rows — zero is not allowed: pad with a repeated row)."""
    device = device or torch.device("cpu")
    rows = list(rows)
    g = generate(policy, tokenizer, [r["prompt_ids"] for r in rows], gen, seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = pad_batch(g.prompt_ids, g.response_ids, pad, device)
    mask = shifted(batch) != IGNORE_INDEX  # (B, T-1)
    lengths = torch.tensor([len(r) for r in g.response_ids], dtype=torch.long)
    prompts = [r["prompt_text"] for r in rows]
    scores, score_metrics = scorer(
        prompts,
        g.texts,
        finished=list(g.finished),
        response_lengths=lengths.tolist(),
        columns=column_lists(rows),
    )
    with torch.no_grad():
        old, ent = token_logps(policy, batch, gen.temperature, entropy=True)
        ref_lp = token_logps(ref, batch, gen.temperature) if ref is not None else None
    scores = scores.float().to(device)
    finished = torch.tensor(g.finished, dtype=torch.bool)
    metrics: dict[str, Any] = {
        "reward/mean": float(scores.mean()),
        "reward/_sq": float(scores.square().mean()),  # the loop turns it into the global reward/std
        "_rows": float(len(rows)),
        "entropy": float(ent[mask].mean()) if mask.any() else 0.0,
        "response/length": float(lengths.float().mean()),
        "response/eos_rate": float(finished.float().mean()),
        **{k: float(v) for k, v in score_metrics.items()},
    }
    if ref_lp is not None:
        metrics["kl"] = float(sequence_kl(old, ref_lp, mask).mean())
    return Experience(
        rows=rows,
        batch=batch,
        mask=mask,
        old_logps=old.float(),
        ref_logps=ref_lp.float() if ref_lp is not None else None,
        entropy=ent.float(),
        scores=scores,
        finished=finished,
        lengths=lengths,
        prompts=prompts,
        responses=list(g.texts),
        response_ids=[list(r) for r in g.response_ids],
        metrics=metrics,
    )


def select(exp: Experience, idx: Sequence[int]) -> dict[str, Any]:
    """The tensors of rows `idx` as a minibatch dict (batch keys + mask, old_logps, ref_logps,
    values and any extra per-row tensors the recipe stored in `exp.metrics`-free attributes)."""
    i = torch.as_tensor(list(idx), dtype=torch.long)
    mb: dict[str, Any] = {k: v[i] for k, v in exp.batch.items()}
    mb["mask"] = exp.mask[i]
    mb["old_logps"] = exp.old_logps[i]
    if exp.ref_logps is not None:
        mb["ref_logps"] = exp.ref_logps[i]
    if exp.values is not None:
        mb["values"] = exp.values[i]
    return _trim(mb)


def _trim(mb: dict[str, Any]) -> dict[str, Any]:
    """Drop trailing all-padding columns of a minibatch (its rows may be shorter than the batch's)."""
    width = int(mb["attention_mask"].sum(-1).max())
    out = {}
    for k, v in mb.items():
        if torch.is_tensor(v) and v.dim() == 2:
            full = k in ("input_ids", "attention_mask", "labels")
            out[k] = v[:, :width] if full else v[:, : width - 1]
        else:
            out[k] = v
    return out
