"""Consolidated weights of a (possibly ZeRO-3 sharded) engine, and a plain Hugging Face export.

Parameters are gathered one at a time (a collective on every rank) and copied to CPU on rank 0
only, so the peak extra memory on any rank is one full parameter, never the model.

Under bf16 mixed precision DeepSpeed's module holds bf16 copies; the weights the optimizer
updates are its fp32 master partitions. Those are what is consolidated for a trainable
parameter (then cast to `dtype`), so "keep the training dtype" means fp32 as in a one-process
bf16-autocast run, and a bfloat16 export is the master weights rounded once — bit-equal to the
engine's bf16 parameters, which DeepSpeed refreshes from the masters the same way each step.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from fastalign.engine.dist import barrier, is_main_process
from fastalign.engine.gather import gathered_params, is_zero3_param
from fastalign.models import resolve_dtype, unwrap_model
from fastalign.models.export import atomic_folder


def consolidated_state_dict(
    engine_or_model, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (CPU tensors, cast to `dtype` if given), None on other ranks.

    A trainable low-precision parameter contributes its fp32 master weight (see the module
    docstring). Collective: every rank must call it. Tied weights appear under each of their
    names (sharing one tensor), as in `module.state_dict()`."""

    module = unwrap_model(engine_or_model)
    main = is_main_process()
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}  # on every rank: tied tensors are gathered once
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in done:
            full = _full_master(t)
            if full is not None:
                full = full.detach().to("cpu", copy=True) if main else None
            else:
                with gathered_params([t]) if is_zero3_param(t) else nullcontext():
                    full = t.detach().to("cpu", copy=True) if main else None
            if full is not None and dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            done[id(t)] = full
        if main:
            out[name] = done[id(t)]
    return out if main else None


def _full_master(t: torch.Tensor) -> torch.Tensor | None:
    """The full fp32 master weight of a trainable bf16/fp16 DeepSpeed parameter (collective under
    ZeRO-3: an all-gather of the fp32 partitions), None for anything else (fp32 training — the
    module's parameter *is* the master —, frozen engines, buffers, plain models)."""
    if not isinstance(t, torch.nn.Parameter) or t.dtype == torch.float32 or not t.requires_grad:
        return None
    if not (hasattr(t, "_z3_optimizer") or hasattr(t, "_hp_mapping")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(t)


def export_hf(engine_or_model, tokenizer, out_dir: str | os.PathLike, dtype: str | torch.dtype | None = None):
    """Rank 0 writes a plain transformers folder (config.json, model.safetensors, tokenizer files)
    from the consolidated weights; `dtype` ("float32" / "bfloat16" / "float16") casts them, None
    keeps the training dtype (fp32 under bf16 mixed precision: the master weights). Written
    beside `out_dir` and renamed into place (never half-written), with the permissions of the
    process umask (`fastalign.models.export.atomic_folder`).
    Collective; every rank returns the resolved path after the write has finished."""

    cast = None if dtype is None else resolve_dtype(dtype)
    state = consolidated_state_dict(engine_or_model, dtype=cast)
    out = Path(out_dir).expanduser().resolve()
    if is_main_process():
        base = unwrap_model(engine_or_model)
        with atomic_folder(out, "export_hf") as tmp:
            base.save_pretrained(str(tmp), state_dict=state)
            written = next(iter(state.values())).dtype if cast is None else cast
            cfg_file = tmp / "config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["dtype"] = str(written).split(".")[-1]
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    barrier()
    return out
