"""The reference model's sequence log-probs: a scorer (frozen copy, the initial policy, or the LoRA
base model) and the on-disk cache that `precompute_ref_logps: true` computes once before training
(`<output_dir>/ref_logps.safetensors`), then the reference model is freed."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastalign.engine.forward import sequence_logps_of
from fastalign.trainers.datasets import Concat
from fastalign.trainers.identity import model_sha256
from fastalign.trainers.runtime import Runtime, autocast_dtype, say
from fastalign.trainers.setup import load_frozen_lm

Batch = dict[str, Any]


def reference_scorer(
    cfg, model, device, average: bool, rt: Runtime | None = None
) -> Callable[[Batch], torch.Tensor]:
    """batch -> (rows,) reference sequence log-probs, without gradients.

    With `precompute_ref_logps` and no separate reference, the policy itself scores the data
    before its first step (it *is* the reference then), so no second copy is ever loaded.
    Under ZeRO-3 the policy cannot run before its engine exists, and LoRA's disabled-adapter
    forward bypasses the engine: the reference is always a frozen sharded engine there."""
    fused = cfg.train.fused
    section = getattr(cfg, cfg.method)
    reference = section.reference
    if getattr(rt, "stage", None) == 3:
        ref = load_frozen_lm(reference or cfg.model.path, cfg.model, device, rt)

        def score_frozen(batch):
            with torch.no_grad():
                return sequence_logps_of(ref, batch, fused, average)

        return score_frozen
    if reference is None and section.precompute_ref_logps and not cfg.model.lora.r:

        def score_initial(batch):
            was = model.training
            model.eval()
            with torch.no_grad():
                out = sequence_logps_of(model, batch, fused, average)
            model.train(was)
            return out

        return score_initial
    if reference is None and cfg.model.lora.r:

        def score_base(batch):  # LoRA: the frozen base model is the reference
            with torch.no_grad(), model.disable_adapter():
                return sequence_logps_of(model, batch, fused, average)

        return score_base
    ref = load_frozen_lm(reference or cfg.model.path, cfg.model, device)

    def score(batch):
        with torch.no_grad():
            return sequence_logps_of(ref, batch, fused, average)

    return score


def cached_reference(
    cfg, score, data_sets, collate, device, keys, rows_per_example, average, rt=None
) -> dict[int, torch.Tensor]:
    reference = getattr(cfg, cfg.method).reference
    extra = {
        # the weights' content, not their path: a model retrained into the same folder is another model
        "reference_sha256": model_sha256(
            reference or cfg.model.path, None if reference else cfg.model.gguf_file
        ),
        "dtype": cfg.model.dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "average": average,
        "fused": cfg.train.fused,
        "lora": cfg.model.lora.r,
        "rows": rows_per_example,
        "mixed_precision": cfg.train.mixed_precision,
    }
    amp = autocast_dtype(cfg.train.mixed_precision, device)
    data = Concat([d for d in data_sets if d])
    main = rt is None or rt.is_main
    if rt is not None:
        rt.barrier()  # every rank sees the same cache file (or none) before deciding to score
    cache = precompute_sequence_logps(
        data,
        collate,
        score,
        cache_file=Path(cfg.train.output_dir) / "ref_logps.safetensors",
        keys=keys,
        extra=extra,
        batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
        device=device,
        rows_per_example=rows_per_example,
        desc="reference log-probs",
        amp=amp,
        write=main,
    )
    if rt is not None:
        rt.barrier()
    return cache


def from_cache(cache: dict[int, torch.Tensor], batch: Batch, device) -> torch.Tensor:
    """(B, rows_per_example) cached reference log-probs of the batch's examples."""
    return torch.stack([cache[int(i)] for i in batch["index"].tolist()]).to(device)


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
    fp = _fingerprint(data, keys, extra)
    if cache_file.is_file():
        with safe_open(str(cache_file), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") == fp:
            t = load_file(str(cache_file))
            say(f"{desc}: reusing {cache_file} (same reference weights, data and settings)")
            return dict(zip(t["index"].tolist(), t["logps"], strict=True))
        if write:
            say(f"{desc}: {cache_file} holds other reference weights, data or settings: recomputing")
    idx_all, vals = [], []
    n = len(data)
    bar = None
    t0 = time.perf_counter()
    if sys.stderr.isatty() and write:
        from tqdm.auto import tqdm  # only when a bar is drawn

        bar = tqdm(total=n, desc=desc, dynamic_ncols=True)
    elif write:
        say(f"{desc}: scoring {n} examples once (cached in {cache_file}) ...")
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
    elif write:
        say(f"{desc}: {n} examples scored in {time.perf_counter() - t0:.0f}s")
    logps = torch.cat(vals)
    if not write:
        return dict(zip(idx_all, logps, strict=True))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    save_file({"index": torch.tensor(idx_all), "logps": logps}, str(tmp), metadata={"fingerprint": fp})
    tmp.replace(cache_file)
    return dict(zip(idx_all, logps, strict=True))
