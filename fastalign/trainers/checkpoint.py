"""Checkpoints for exact resume: model, optimizer, scheduler, RNG states and the data position.

Layout: `<output_dir>/checkpoints/step-00000012/` with `model.safetensors`, `optimizer.pt`,
`rng.pt` and `trainer_state.json`. Under DeepSpeed (`runtime.ZeRO`) the same folder holds the
engine's sharded `zero/` tag folder (written collectively), `rng_rank<r>.pt` per rank and
`trainer_state.json` (with `world_size`), committed by rank 0 with the same atomic rename.
A checkpoint is written into `step-N.tmp/` and renamed when
complete, so a crash (even SIGKILL) mid-write leaves the previous checkpoints intact and the torn
one is ignored (and removed) on resume. Only the last `keep_last` are kept. Everything is loaded
with safetensors or `torch.load(weights_only=True)`: no pickled code.

The data position needs no state of its own: the loop derives the order of epoch e from
`seed + e`, so the optimizer step count fixes where the data stream continues.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (torn `.tmp` folders are not listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": _to_plain(random.getstate()), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the legacy global RNG user code may draw from
        state["numpy"] = [
            kind,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(  # noqa: NPY002
            (kind, keys.numpy().astype("uint32"), pos, has_gauss, cached)
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
    scaler: Any = None,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`. Returns its folder."""
    from safetensors.torch import save_model

    tmp = prepare_checkpoint(output_dir, step)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) tensors
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        tmp / "optimizer.pt",
    )
    torch.save(_rng_state(), tmp / "rng.pt")
    return commit_checkpoint(output_dir, step, tmp, extra, keep_last)


def prepare_checkpoint(output_dir: str | Path, step: int) -> Path:
    """A fresh, empty `step-N.tmp/` folder to write checkpoint `step` into."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(
    output_dir: str | Path, step: int, tmp: Path, extra: dict[str, Any] | None, keep_last: int
) -> Path:
    """Write trainer_state.json into `tmp`, rename it to `step-N` and prune to `keep_last`."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    state = {"step": step, **(extra or {})}
    with open(tmp / "trainer_state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.del` folder (cleaned up later), never a
    half-deleted `step-N` that looks like a checkpoint."""
    doomed = path.with_name(path.name + ".del")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_torn(output_dir: str | Path) -> None:
    """Remove what a killed run left half-written or half-deleted."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        torn = p.name.endswith((".tmp", ".del")) or (
            _STEP_DIR.match(p.name) and not (p / "trainer_state.json").is_file()
        )
        if torn:
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns trainer_state.json (with "step")."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete fastalign checkpoint (no trainer_state.json)")
    device = next(model.parameters()).device
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler") is not None:
        scaler.load_state_dict(opt["scaler"])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    with open(path / "trainer_state.json") as f:
        return json.load(f)


def find_resume_point(output_dir: str | Path, resume: str) -> Path | None:
    """`resume`: "auto" (latest complete checkpoint, if any), "never", or a checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        clean_torn(output_dir)
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r}: not a checkpoint folder (expected {path}/trainer_state.json)"
        )
    return path
