"""The example sequences a recipe trains on: views over the loaded rows (a subset, several sets as
one, index-shifted, all-tokens SFT), the deterministic held-out split, and `load_datasets`, which
reads the `data:` section into (train, eval) and prints the data reports."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from fastalign.config import DataConfig
from fastalign.constants import IGNORE_INDEX
from fastalign.data import DataWarning, load_examples
from fastalign.trainers.runtime import say


class Rows(Sequence):
    """A view of `base` restricted to `idx` (keeps each example's own "index")."""

    def __init__(self, base: Sequence[dict], idx: Sequence[int]) -> None:
        self.base, self.idx = base, list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.base[self.idx[i]]


class Concat(Sequence):
    """Several example sequences as one."""

    def __init__(self, parts: Sequence[Sequence[dict]]) -> None:
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int) -> dict:
        for p in self.parts:
            if i < len(p):
                return p[i]
            i -= len(p)
        raise IndexError(i)


class AllTokens(Sequence):
    """SFT examples with every token but the first as a label (`sft.completion_only: false`)."""

    def __init__(self, base: Sequence[dict]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.base[i])
        row["labels"] = [IGNORE_INDEX, *row["input_ids"][1:]]
        return row


class Offset(Sequence):
    """`base` with every example's "index" shifted by `offset`: a separate eval file then shares one
    index space with the training rows (the reference log-prob cache is keyed by index)."""

    def __init__(self, base: Sequence[dict], offset: int) -> None:
        self.base, self.offset = base, offset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.base[i])
        row["index"] = int(row["index"]) + self.offset
        return row


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) row split with round(fraction · n) eval rows (≥ 1 if fraction > 0)."""
    if fraction <= 0:
        return list(range(n)), []
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise ValueError(f"data.eval_fraction={fraction} leaves no training rows out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def load_datasets(kind: str, dcfg: DataConfig, tokenizer, seed: int, name: str):
    """(train, eval) example sequences from the `data:` section; prints the data reports."""

    def load(source: str, what: str):
        with warnings.catch_warnings():  # DataWarnings are in the report's summary, printed below
            warnings.simplefilter("ignore", DataWarning)
            examples, report = load_examples(
                kind,
                source,
                tokenizer,
                fmt=dcfg.format,
                columns=dict(dcfg.columns) or None,
                max_length=dcfg.max_length,
                max_prompt_length=dcfg.max_prompt_length,
                strict=dcfg.strict,
                max_rows=dcfg.max_rows,
                split=dcfg.split,
            )
        say(f"[{name}] {what} data {source}: {report.summary()}")
        return examples, report

    if not dcfg.train:
        raise ValueError("data.train: no training data given (a file, a save_to_disk folder or a hub name)")
    train, report = load(dcfg.train, "train")
    if dcfg.eval:
        evals, _ = load(dcfg.eval, "eval")
        return train, Offset(evals, len(train)), report
    tr_idx, ev_idx = holdout_split(len(train), dcfg.eval_fraction, seed)
    if not ev_idx:
        return train, None, report
    return Rows(train, tr_idx), Rows(train, ev_idx), report
