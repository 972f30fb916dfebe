"""Export a trained model as a plain Hugging Face folder that needs neither fastalign nor peft.

config.json + safetensors weights (+ generation_config.json, tokenizer files), LoRA merged into the
base weights by default, optionally cast. The folder is written beside `out_dir` under a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint where a loader (or a
resume) would find it. Before the rename every folder and file in it gets the permissions the
process umask asks for: the temporary folder comes from `tempfile.mkdtemp` (always 0700) and some
writers (safetensors' `model.safetensors`) create 0600 files, which left exports `drwx------` /
`-rw-------` under umask 022, unreadable to the colleagues a 022 umask is meant to let in.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastalign.files import apply_umask
from fastalign.models.causal_lm import is_gguf_dequantized, resolve_dtype, unwrap_model

VALUE_HEAD_FILE = "value_head.safetensors"  # beside the backbone's files in a ValueHeadModel folder


def _is_peft(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "get_base_model")


def _export_view(model, merge_lora: bool):
    """The transformers model to write. A LoRA model is merged in a deep copy: merging in place
    would end training (and merge+unmerge in bf16 drifts the frozen base weights)."""
    if _is_peft(model):
        if merge_lora:
            return copy.deepcopy(model).merge_and_unload(), False
        return model, True  # adapter-only folder (peft format), loadable by peft
    return unwrap_model(model), False


def _write_model(model, folder: Path, *, merge_lora: bool, dtype: torch.dtype | None) -> None:
    target, adapter_only = _export_view(model, merge_lora)
    if adapter_only:
        target.save_pretrained(str(folder))
        return
    quantizer = getattr(target, "hf_quantizer", None) if is_gguf_dequantized(target) else None
    if quantizer is not None:  # loaded by plain transformers from a .gguf: weights are dequantised
        target.hf_quantizer = None
    try:
        _save_transformers(target, folder, dtype)
    finally:
        if quantizer is not None:
            target.hf_quantizer = quantizer
    if quantizer is not None:  # the written weights are plain: no quantization_config for loaders
        cfg_file = folder / "config.json"
        cfg = json.loads(cfg_file.read_text())
        if cfg.pop("quantization_config", None) is not None:
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_transformers(target, folder: Path, dtype: torch.dtype | None) -> None:
    state = None
    if dtype is not None and dtype != target.dtype:
        state = {k: v.detach().to(dtype) for k, v in target.state_dict().items()}
    target.save_pretrained(str(folder), state_dict=state)
    if state is not None:  # save_pretrained records the in-memory dtype; record the written one
        cfg_file = folder / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["dtype"] = str(dtype).split(".")[-1]
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_pretrained(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    merge_lora: bool = True,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write `model` (+ `tokenizer` when given) to `out_dir`, replacing it atomically; returns the path.

    Handles causal LMs, reward models, peft-wrapped models (merged unless `merge_lora=False`, which
    writes the adapter only) and `ValueHeadModel` (backbone folder + value_head.safetensors).
    `dtype` ("float32" / "bfloat16" / "float16") casts the written weights; None keeps them."""
    cast = None if dtype is None else resolve_dtype(dtype)
    with atomic_folder(out_dir, "save_pretrained") as tmp:
        if is_value_head_model(model):
            _write_model(model.backbone, tmp, merge_lora=merge_lora, dtype=cast)
            head = model.value_head.state_dict()
            head = {k: v.detach().to(cast or v.dtype).contiguous() for k, v in head.items()}
            save_file(head, str(tmp / VALUE_HEAD_FILE), metadata={"format": "pt"})
        else:
            _write_model(model, tmp, merge_lora=merge_lora, dtype=cast)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).expanduser().resolve()


def is_value_head_model(model) -> bool:
    """A `ValueHeadModel` (models/reward.py): a backbone plus a Linear(H, 1) value head. Told by
    its parts, so this module does not import reward.py (which imports this one to save)."""
    return isinstance(getattr(model, "backbone", None), torch.nn.Module) and isinstance(
        getattr(model, "value_head", None), torch.nn.Linear
    )


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, op: str) -> Iterator[Path]:
    """Yield a temporary sibling folder of `out_dir` to write into; on success it gets the umask's
    permissions (`apply_umask`) and replaces `out_dir` (the old one is moved aside, then
    removed), on any error it is deleted, so readers never see a half-written model folder."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{op}: {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)  # before the rename: the folder is never visible with mkdtemp's 0700
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
