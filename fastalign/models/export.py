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
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fastalign.models.causal_lm import is_gguf_dequantized, resolve_dtype, unwrap_model


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
    from safetensors.torch import save_file

    from fastalign.models.reward import VALUE_HEAD_FILE, ValueHeadModel

    cast = None if dtype is None else resolve_dtype(dtype)
    with atomic_folder(out_dir, "save_pretrained") as tmp:
        if isinstance(model, ValueHeadModel):
            _write_model(model.backbone, tmp, merge_lora=merge_lora, dtype=cast)
            head = model.value_head.state_dict()
            head = {k: v.detach().to(cast or v.dtype).contiguous() for k, v in head.items()}
            save_file(head, str(tmp / VALUE_HEAD_FILE), metadata={"format": "pt"})
        else:
            _write_model(model, tmp, merge_lora=merge_lora, dtype=cast)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).expanduser().resolve()


def process_umask() -> int:
    """The process umask. Read from /proc/self/status (Linux >= 4.7) where there is one: the
    portable way, `os.umask` set-and-restore, briefly changes it for every thread."""
    try:
        m = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), flags=re.M)
    except OSError:
        m = None
    if m is not None:
        return int(m.group(1), 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the permissions a plain `mkdir` / `open(..., "w")`
    would have had under the current umask: folders 0o777 & ~umask, files 0o666 & ~umask (0o777
    & ~umask when the file has an execute bit). Symbolic links are left alone (Linux cannot
    chmod a link, and following one could change a file outside `root`)."""
    mask = process_umask()
    folder_mode, file_mode, exec_mode = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    root = Path(root)
    os.chmod(root, folder_mode)
    for here, folders, files in os.walk(root):
        for name in folders:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, exec_mode if st.st_mode & 0o111 else file_mode)


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
