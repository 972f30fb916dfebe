"""Pieces every recipe shares: model + data loading, hidden states and per-token log-probs on the
fused (hidden state + lm_head weight) or unfused (full logits) path, packed batches, and the
reference log-prob cache."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


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
        row["labels"] = [IGNORE, *row["input_ids"][1:]]
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


def resolve_device_for(cfg, rt=None) -> torch.device:
    from fastalign.trainers.loop import resolve_device

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return rt.device(cfg.train.device) if rt is not None else resolve_device(cfg.train.device)


def setup(cfg, *, reward: bool = False):
    """(runtime, device, tokenizer, policy model) of a recipe: the model is built inside the
    runtime's `init_models()` (ZeRO-3: sharded as it loads)."""
    from fastalign.trainers import runtime

    rt = runtime.make(cfg)
    device = resolve_device_for(cfg, rt)
    with rt.init_models():
        tok, model = load_tokenizer_and_model(cfg.model, device, reward=reward)
    if rt.distributed and getattr(rt, "stage", 0) == 3:
        held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(
            f"[rank {rt.rank}/{rt.world}] ZeRO-3 policy: this rank holds {held}/{total} parameter "
            f"elements ({held / max(1, total):.3f})",
            file=sys.stderr,
        )
    return rt, device, tok, model


def load_tokenizer_and_model(mcfg, device: torch.device, *, reward: bool = False):
    from fastalign.models import load_causal_lm, load_reward_model, load_tokenizer

    tok = load_tokenizer(
        mcfg.tokenizer or mcfg.path,
        gguf_file=mcfg.gguf_file if not mcfg.tokenizer else None,
        trust_remote_code=mcfg.trust_remote_code,
    )
    lora = (
        {
            "r": mcfg.lora.r,
            "alpha": mcfg.lora.alpha,
            "dropout": mcfg.lora.dropout,
            "target_modules": list(mcfg.lora.target_modules),
        }
        if mcfg.lora.r
        else None
    )
    kwargs = dict(
        gguf_file=mcfg.gguf_file,
        dtype=mcfg.dtype,
        attn_implementation=mcfg.attn_implementation,
        gradient_checkpointing=mcfg.gradient_checkpointing,
        lora=lora,
        device=str(device),
    )
    if reward:
        model = load_reward_model(mcfg.path, pad_token_id=tok.pad_token_id, **kwargs)
    else:
        model = load_causal_lm(mcfg.path, trust_remote_code=mcfg.trust_remote_code, **kwargs)
    return tok, model


def load_frozen_lm(path: str, mcfg, device: torch.device, rt=None) -> torch.nn.Module:
    """A frozen copy (reference model): eval mode, no gradients (ZeRO-3: a sharded frozen engine)."""
    from contextlib import nullcontext

    from fastalign.models import load_causal_lm

    gguf = mcfg.gguf_file if path == mcfg.path else None
    with rt.init_models() if rt is not None else nullcontext():
        ref = load_causal_lm(
            path,
            gguf_file=gguf,
            dtype=mcfg.dtype,
            attn_implementation=mcfg.attn_implementation,
            device=str(device),
            trust_remote_code=mcfg.trust_remote_code,
        )
    ref.eval().requires_grad_(False)
    return rt.frozen(ref) if rt is not None else ref


def load_datasets(kind: str, dcfg, tokenizer, seed: int, name: str):
    """(train, eval) example sequences from the `data:` section; prints the data reports."""
    from fastalign.data import load_examples

    def load(source: str, what: str):
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
        _log(f"[{name}] {what} data {source}: {report.summary()}")
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


def _log(msg: str) -> None:
    from fastalign.trainers.runtime import log

    log(msg)


def export_fn(model: torch.nn.Module, tokenizer, rt=None) -> Callable[[Path], None]:
    """The final export: a plain transformers folder (collective under ZeRO; rank 0 writes)."""

    def export(out_dir: Path, dtype: str | None = None) -> None:
        from fastalign.trainers.runtime import Local

        (rt or Local()).export(model, tokenizer, out_dir, dtype=dtype)

    return export


# ---------------------------------------------------------------------------------------------
# hidden states and per-token log-probs, packed or padded
# ---------------------------------------------------------------------------------------------
def _unpack(batch: dict[str, Any], x: torch.Tensor, fill) -> torch.Tensor:
    from fastalign.data import unpack_rows

    return unpack_rows(x, batch["seq_id"], batch["num_rows"], fill=fill)


def _packed_mask(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
    """Attention mask of a packed row. flash_attention_2 needs none: it finds the sequences from the
    restarting position_ids (varlen kernels, truly padding-free). sdpa / eager get an additive
    block-diagonal causal mask (cost quadratic in the packed length: packing on CPU saves padding,
    not attention work)."""
    if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        return None
    from fastalign.data import block_causal_mask

    return block_causal_mask(batch["seq_id"], dtype=next(model.parameters()).dtype)


def shifted_labels(batch: dict[str, Any]) -> torch.Tensor:
    """(R, T-1) next-token labels aligned with hidden[:, :-1] (unpacked rows for packed batches)."""
    labels = batch["labels"]
    if "seq_id" in batch:
        labels = _unpack(batch, labels, IGNORE)
    return labels[:, 1:]


def head_params(model):
    """`with head_params(model) as (weight, bias)`: the lm_head for the fused losses — gathered
    under ZeRO-3 (collective; compute the loss inside the block), else `lm_head_weight(model)`."""
    from fastalign.engine import fused_head_params

    return fused_head_params(model)


def hidden_states(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(R, T-1, H) last hidden states predicting `shifted_labels(batch)`, without logits.

    `model` may be a DeepSpeed engine: its root forward runs (lm_head skipped), as ZeRO-3 needs."""
    if type(model).__name__ == "DeepSpeedEngine":
        from fastalign.engine import hidden_states as forward
    else:
        from fastalign.models import decoder_hidden_states as forward

    if "seq_id" in batch:
        h = forward(model, batch["input_ids"], _packed_mask(model, batch), batch["position_ids"])
        h = _unpack(batch, h, 0.0)
    else:
        h = forward(model, batch["input_ids"], batch["attention_mask"])
    return h[:, :-1]


def full_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(R, T-1, V) logits — the unfused path (`train.fused: false`), for comparison."""
    if "seq_id" in batch:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=_packed_mask(model, batch),
            position_ids=batch["position_ids"],
        ).logits
        logits = _unpack(batch, logits, 0.0)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1]


def token_logps(
    model: torch.nn.Module, batch: dict[str, Any], fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp32 log-probs (R, T-1) (0 at ignored positions) and the shifted labels."""
    labels = shifted_labels(batch)
    if fused:
        from fastalign.ops import linear_logprobs

        hidden = hidden_states(model, batch)  # before the head is gathered (ZeRO-3 forward hooks)
        with head_params(model) as (weight, bias):
            return linear_logprobs(hidden, weight, labels, bias=bias), labels
    logits = full_logits(model, batch).float()
    safe = labels.clamp(min=0).unsqueeze(-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe).squeeze(-1)
    return logp.masked_fill(labels == IGNORE, 0.0), labels


def sequence_logps_of(model, batch, fused: bool, average: bool) -> torch.Tensor:
    from fastalign.losses import sequence_logps

    logp, labels = token_logps(model, batch, fused)
    return sequence_logps(logp, labels != IGNORE, average=average)


# ---------------------------------------------------------------------------------------------
# reference log-probs: computed once and cached on disk (`precompute_ref_logps: true`)
# ---------------------------------------------------------------------------------------------
def _fingerprint(data: Sequence[dict], keys: Sequence[str], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for i in range(len(data)):
        row = data[i]
        h.update(json.dumps([row["index"], *[list(row[k]) for k in keys]]).encode())
    return h.hexdigest()[:20]


def precompute_sequence_logps(
    data: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, Any]],
    score: Callable[[dict[str, Any]], torch.Tensor],
    *,
    cache_file: Path,
    keys: Sequence[str],
    extra: dict,
    batch_size: int,
    device: torch.device,
    rows_per_example: int,
    desc: str,
    amp: torch.dtype | None = None,
    write: bool = True,
) -> dict[int, torch.Tensor]:
    """{example index: (rows_per_example,) float64 log-probs} for every example, from `cache_file`
    when its fingerprint (data tokens, reference model, settings, precision) matches, else computed
    once with `score(batch) -> (rows,)` and saved (atomically; only when `write`: under a launcher
    every rank scores every row, so the ZeRO-3 gathers match, and rank 0 alone writes)."""
    from safetensors.torch import load_file, save_file

    fp = _fingerprint(data, keys, extra)
    if cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") == fp:
            t = load_file(str(cache_file))
            return dict(zip(t["index"].tolist(), t["logps"], strict=True))
    idx_all, vals = [], []
    n = len(data)
    bar = None
    if sys.stderr.isatty() and write:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, dynamic_ncols=True)
    # Same autocast as training: at step 0 the policy's log-probs then equal these exactly.
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for start in range(0, n, batch_size):
            rows = [data[i] for i in range(start, min(n, start + batch_size))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
            s = score(batch).double().cpu()  # (rows_per_example * b,), example-major blocks
            b = len(rows)
            idx_all.extend(int(r["index"]) for r in rows)
            vals.append(s.view(rows_per_example, b).t())
            if bar is not None:
                bar.update(b)
    if bar is not None:
        bar.close()
    logps = torch.cat(vals)
    if not write:
        return dict(zip(idx_all, logps, strict=True))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    save_file({"index": torch.tensor(idx_all), "logps": logps}, str(tmp), metadata={"fingerprint": fp})
    tmp.replace(cache_file)
    return dict(zip(idx_all, logps, strict=True))
