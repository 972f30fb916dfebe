"""Forward passes the recipes share, on a plain model or a DeepSpeed engine, padded or packed:
hidden states or logits aligned with the next-token labels, and per-token log-probs on the fused
(hidden states + lm_head weight, no logits) or unfused (full logits) path.

`fused_head_loss` is the one place that owns the order the fused path needs under ZeRO-3:
hidden states first (through the engine's root forward), then the gathered lm_head, then the
loss *inside* the gather. A loss computed after the gather is left reads freed storage; hidden
states computed inside it give a tied embedding a full-size gradient where ZeRO-3 expects its
shard. Every recipe goes through it (tests/test_layers.py checks that no other module calls
`fused_head_params`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from fastalign.constants import IGNORE_INDEX
from fastalign.data import block_causal_mask, unpack_rows
from fastalign.engine.engine import hidden_states as engine_hidden_states
from fastalign.engine.gather import fused_head_params
from fastalign.losses import sequence_logps
from fastalign.models import decoder_hidden_states
from fastalign.models.causal_lm import PaddingFreeUnsupported, supports_seq_lens, unwrap_model
from fastalign.ops import linear_logprobs

T = TypeVar("T")
Batch = dict[str, Any]


def _unpack(batch: Batch, x: torch.Tensor, fill) -> torch.Tensor:
    return unpack_rows(x, batch["seq_id"], batch["num_rows"], fill=fill)


def _packed_mask(model: torch.nn.Module, batch: Batch) -> torch.Tensor | None:
    """Attention mask of a packed row. flash_attention_2 needs none: it finds the sequences from the
    restarting position_ids (varlen kernels, truly padding-free). sdpa / eager get an additive
    block-diagonal causal mask (cost quadratic in the packed length: packing on CPU saves padding,
    not attention work)."""
    if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        return None
    return block_causal_mask(batch["seq_id"], dtype=next(model.parameters()).dtype)


def shifted_labels(batch: Batch) -> torch.Tensor:
    """(R, T-1) next-token labels aligned with hidden[:, :-1] (unpacked rows for packed batches)."""
    labels = batch["labels"]
    if "seq_id" in batch:
        labels = _unpack(batch, labels, IGNORE_INDEX)
    return labels[:, 1:]


def _right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Row lengths of a right-padded (R, T) mask that has padding; None when there is none (a
    padded batch is then already padding-free) or the mask is not ones-then-zeros per row."""
    lens = attention_mask.sum(1)
    if int(lens.min()) == attention_mask.shape[1]:
        return None
    ones_first = torch.arange(attention_mask.shape[1], device=lens.device)[None, :] < lens[:, None]
    if not torch.equal(attention_mask.bool(), ones_first) or int(lens.min()) == 0:
        return None
    return lens.tolist()


def _padding_free_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor | None:
    """(R, T, H) hidden states of a right-padded batch computed on its real tokens only: the rows
    go through the decoder packed into one sequence (attention kept inside each row, see
    `fastalign.models.causal_lm._sdpa_varlen`) and come back to (R, T, H) with zeros at the padding,
    which the loss never reads (labels are ignored there). The padded batch gives the same values
    (up to float rounding: other matmul shapes); it computes every layer on R·T positions where
    this computes on sum(lengths), and keeps activations for those alone. None when it does not
    apply (a DeepSpeed engine, another attention, no padding)."""
    if type(model).__name__ == "DeepSpeedEngine" or not supports_seq_lens(model):
        return None
    mask = batch["attention_mask"]
    lens = _right_padded_lengths(mask)
    if lens is None:
        return None
    keep = mask.bool()
    ids = batch["input_ids"][keep][None]  # (1, N): row 0's tokens, then row 1's, ...
    pos = (mask.cumsum(1) - 1)[keep][None]  # positions restart at 0 per row
    try:
        h = decoder_hidden_states(model, ids, None, pos, seq_lens=tuple(lens))
    except PaddingFreeUnsupported:
        return None  # the model is marked: later batches go padded at once
    r, t = mask.shape
    where = keep.view(-1).nonzero().squeeze(1)
    return h.new_zeros(r * t, h.shape[-1]).index_copy(0, where, h[0]).view(r, t, -1)


def shifted_hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(R, T-1, H) last hidden states predicting `shifted_labels(batch)`, without logits.

    `model` may be a DeepSpeed engine: its root forward runs (lm_head skipped), as ZeRO-3 needs.
    A right-padded batch on a plain model runs padding-free (`_padding_free_hidden`)."""
    forward = engine_hidden_states if type(model).__name__ == "DeepSpeedEngine" else decoder_hidden_states
    if "seq_id" in batch:
        h = forward(model, batch["input_ids"], _packed_mask(model, batch), batch["position_ids"])
        h = _unpack(batch, h, 0.0)
    else:
        h = _padding_free_hidden(model, batch)
        if h is None:
            h = forward(model, batch["input_ids"], batch["attention_mask"])
    return h[:, :-1]


def shifted_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(R, T-1, V) logits — the unfused path (`train.fused: false`), for comparison. A batch that
    runs padding-free takes the same hidden states as the fused path, then the model's lm_head
    module (full logits, LoRA on the head included)."""
    if "seq_id" not in batch:
        h = _padding_free_hidden(model, batch)
        if h is not None:
            return unwrap_model(model).get_output_embeddings()(h[:, :-1])
    if "seq_id" in batch:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=_packed_mask(model, batch),
            position_ids=batch["position_ids"],
        ).logits
        logits = _unpack(batch, logits, 0.0)
    else:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    return logits[:, :-1]


def fused_head_loss(
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], T],
) -> T:
    """`loss_fn(hidden (R, T-1, H), lm_head weight (V, H), bias (V,) or None)` in the order ZeRO-3
    needs (see the module doc). Collective under ZeRO-3: every rank calls it together. The result
    may be differentiated after this returns (the gathered head is re-gathered in backward)."""
    hidden = shifted_hidden_states(model, batch)
    with fused_head_params(model) as (weight, bias):
        return loss_fn(hidden, weight, bias)


def token_logps(
    model: torch.nn.Module,
    batch: Batch,
    *,
    fused: bool = True,
    temperature: float = 1.0,
    entropy: bool = False,
    grad_filter: float | str | None = "auto",
) -> tuple[torch.Tensor, ...]:
    """(logp (R, T-1) fp32, 0 at ignored positions, labels (R, T-1)[, entropy (R, T-1)]).

    Fused: `linear_logprobs` on the hidden states and the lm_head; unfused: log-softmax of the full
    logits. `temperature` divides the logits (sampling's distribution)."""
    labels = shifted_labels(batch)
    if fused:
        out = fused_head_loss(
            model,
            batch,
            lambda h, w, b: linear_logprobs(
                h,
                w,
                labels,
                bias=b,
                temperature=temperature,
                return_entropy=entropy,
                grad_filter=grad_filter,
            ),
        )
        return (out[0], labels, out[1]) if entropy else (out, labels)
    logits = shifted_logits(model, batch).float() / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(labels == IGNORE_INDEX, 0.0)
    if not entropy:
        return logp, labels
    ent = -(logsm.exp() * logsm).sum(-1).masked_fill(labels == IGNORE_INDEX, 0.0)
    return logp, labels, ent


def sequence_logps_of(model: torch.nn.Module, batch: Batch, fused: bool, average: bool) -> torch.Tensor:
    """(R,) summed (or length-averaged) log-probs of each row's labelled tokens."""
    logp, labels = token_logps(model, batch, fused=fused)
    return sequence_logps(logp, labels != IGNORE_INDEX, average=average)
