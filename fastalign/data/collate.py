"""Collators (padding or padding-free packing) and the two helpers packing needs.

Labels are Hugging Face style, NOT shifted: labels[t] = input_ids[t] on learnt (response) tokens and
-100 on prompt and padding; the loss shifts (`hidden[:, :-1]` predicts `labels[:, 1:]`). The first
token of every row always gets label -100 (it can never be predicted), so a global shift over a
packed (1, N) batch never predicts a token from the previous sequence.

Packing: the rows of a batch are concatenated into one (1, N) sequence with `position_ids` that
restart at 0 per row and `seq_id` naming each token's row. `block_causal_mask(seq_id)` gives the
4-D mask that keeps attention inside a row, and `unpack_rows` puts per-token outputs (hidden states,
labels) back into padded (rows, T) form in the same row order as the unpacked batch.

torch is imported inside the functions: `import fastalign.data` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastalign.constants import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def _rows_to_batch(ids: list[list[int]], labels: list[list[int]], pad_token_id: int, packing: bool) -> dict:

    labels = [[IGNORE_INDEX, *lab[1:]] if lab else [] for lab in labels]
    if packing:
        n = [len(r) for r in ids]
        return {
            "input_ids": torch.tensor([[t for r in ids for t in r]], dtype=torch.long),  # (1, N)
            "position_ids": torch.tensor([[p for k in n for p in range(k)]], dtype=torch.long),
            "labels": torch.tensor([[t for r in labels for t in r]], dtype=torch.long),
            "seq_id": torch.tensor([[i for i, k in enumerate(n) for _ in range(k)]], dtype=torch.long),
            "num_rows": len(ids),
        }
    t = max(len(r) for r in ids)
    return {
        "input_ids": torch.tensor(
            [r + [pad_token_id] * (t - len(r)) for r in ids], dtype=torch.long
        ),  # (R, T)
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in ids], dtype=torch.long),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (t - len(r)) for r in labels], dtype=torch.long),
    }


def _check(examples: list[dict], keys: tuple[str, ...], name: str) -> None:
    if not examples:
        raise ValueError(f"{name}: empty batch")
    for i, ex in enumerate(examples):
        missing = [k for k in keys if k not in ex]
        if missing:
            raise ValueError(f"{name}: example {i} lacks {missing} (has {sorted(ex)})")
        if any(len(ex[k]) == 0 for k in keys if k.endswith("_ids")):
            raise ValueError(f"{name}: example {i} has an empty token list")


def _index(examples: list[dict]) -> torch.Tensor:

    return torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long)


class PreferenceCollator:
    """Pairs -> 2B rows: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected (pair b = rows
    b and B+b). Adds "index" (B,) and, when every example has one, "margin" / "p_chosen" (B,) float."""

    def __init__(self, pad_token_id: int, *, packing: bool = False):
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None; pass e.g. tokenizer.pad_token_id or tokenizer.eos_token_id"
            )
        self.pad_token_id, self.packing = int(pad_token_id), packing

    def __call__(self, examples: list[dict]) -> dict:

        _check(examples, ("prompt_ids", "chosen_ids", "rejected_ids", "index"), type(self).__name__)
        ids, labels = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                p, r = list(ex["prompt_ids"]), list(ex[key])
                ids.append(p + r)
                labels.append([IGNORE_INDEX] * len(p) + r)
        batch = _rows_to_batch(ids, labels, self.pad_token_id, self.packing)
        batch["index"] = _index(examples)
        for key in ("margin", "p_chosen"):
            if all(ex.get(key) is not None for ex in examples):
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
        return batch


class SFTCollator:
    """SFT examples -> B rows of input_ids / labels (padded, or packed as in PreferenceCollator)."""

    def __init__(self, pad_token_id: int, *, packing: bool = False):
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None; pass e.g. tokenizer.pad_token_id or tokenizer.eos_token_id"
            )
        self.pad_token_id, self.packing = int(pad_token_id), packing

    def __call__(self, examples: list[dict]) -> dict:
        _check(examples, ("input_ids", "labels", "index"), type(self).__name__)
        for i, ex in enumerate(examples):
            if len(ex["labels"]) != len(ex["input_ids"]):
                raise ValueError(
                    f"SFTCollator: example {i} has {len(ex['labels'])} labels for {len(ex['input_ids'])} ids"
                )
        ids = [list(ex["input_ids"]) for ex in examples]
        batch = _rows_to_batch(ids, [list(ex["labels"]) for ex in examples], self.pad_token_id, self.packing)
        batch["index"] = _index(examples)
        return batch


class KTOCollator:
    """KTO examples -> padded (B, T) prompt+completion rows, "desirable" (B,) bool, "index", and the
    KL rows kl_input_ids / kl_attention_mask / kl_labels (B, T'): prompt_i + completion_{(i-1) mod B}
    (TRL's mismatched pairs for the KL reference point; B == 1 pairs the example with itself). The KL
    rows are not re-truncated: a long prompt with another row's long completion can exceed max_length."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None; pass e.g. tokenizer.pad_token_id or tokenizer.eos_token_id"
            )
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:

        _check(examples, ("prompt_ids", "completion_ids", "label", "index"), type(self).__name__)
        b = len(examples)
        prompts = [list(ex["prompt_ids"]) for ex in examples]
        completions = [list(ex["completion_ids"]) for ex in examples]
        batch = _rows_to_batch(
            [p + c for p, c in zip(prompts, completions, strict=False)],
            [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions, strict=False)],
            self.pad_token_id,
            False,
        )
        kl_completions = [completions[(i - 1) % b] for i in range(b)]
        kl = _rows_to_batch(
            [p + c for p, c in zip(prompts, kl_completions, strict=False)],
            [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, kl_completions, strict=False)],
            self.pad_token_id,
            False,
        )
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([bool(ex["label"]) for ex in examples], dtype=torch.bool)
        batch["index"] = _index(examples)
        return batch


def block_causal_mask(seq_id: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(1, N) seq_id -> (1, 1, N, N) additive mask: 0 where token i may attend to j (same seq_id and
    j <= i), the dtype's most negative finite value elsewhere.

    Why additive float: transformers passes a 4-D `attention_mask` through unchanged
    (`masking_utils._preprocess_mask_arguments`); eager attention ADDS it to the scores (a bool mask
    would add 0 / 1 and mask nothing), while sdpa accepts a bool or a float mask, a float one only in
    the query's dtype. So pass `dtype` = the model's dtype (default float32).
    """

    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(
            f"block_causal_mask: dtype must be a floating dtype (the mask is additive), got {dtype}"
        )
    if seq_id.dim() != 2 or seq_id.shape[0] != 1:
        raise ValueError(f"block_causal_mask: seq_id must be (1, N), got {tuple(seq_id.shape)}")
    s = seq_id[0]
    n = s.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    allowed = causal & (s[:, None] == s[None, :])  # (N, N)
    mask = torch.zeros(n, n, dtype=dtype, device=s.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, N, N)


def unpack_rows(x: torch.Tensor, seq_id: torch.Tensor, num_rows: int, fill=0) -> torch.Tensor:
    """(1, N, ...) packed values -> (num_rows, T_max, ...) right-padded with `fill`, row r holding the
    tokens with seq_id == r in order. Differentiable in `x` (index_put)."""

    if x.dim() < 2 or x.shape[0] != 1 or seq_id.shape != x.shape[:2]:
        raise ValueError(
            "unpack_rows: x (1, N, ...) and seq_id (1, N) must match, "
            f"got {tuple(x.shape)}, {tuple(seq_id.shape)}"
        )
    s = seq_id[0].long()
    if s.numel() and (s.min() < 0 or s.max() >= num_rows):
        raise ValueError(f"unpack_rows: seq_id values must lie in [0, {num_rows})")
    counts = torch.bincount(s, minlength=num_rows)  # (R,)
    starts = counts.cumsum(0) - counts
    order = torch.argsort(s, stable=True)
    rows = s[order]
    pos = torch.arange(s.numel(), device=s.device) - starts[rows]
    t_max = int(counts.max()) if s.numel() else 0
    out = x.new_full((num_rows, t_max, *x.shape[2:]), fill)
    return out.index_put((rows, pos), x[0, order])
