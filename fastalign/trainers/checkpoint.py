"""The one checkpoint format of every recipe, written and read only here.

    <output_dir>/checkpoints/step-00000012/
        trainer_state.json     step, data position, world size, "format": 2 (rank 0)
        <trainable>/           one folder per trainable ("policy", PPO's "value"):
                                 one process: model.safetensors + optimizer.pt (optimizer,
                                 scheduler, grad scaler); ZeRO: DeepSpeed's sharded tag folder
        rng_rank<r>.pt         python / numpy / torch (/ cuda) RNG of rank r
        extra_state.pt         the recipe's stateful objects (KL controller, reward
                               normaliser, watch), rank 0, when it has any

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a crash (even SIGKILL)
mid-write leaves the previous checkpoints intact and the torn one is ignored (and removed) on
resume. Only the last `keep_last` are kept. Everything is loaded with safetensors or
`torch.load(weights_only=True)`: no pickled code.

Checkpoints of the earlier layout (format 1: `model.safetensors` or `zero/` or
`<name>.safetensors` beside trainer_state.json, no "format" key) are refused with a message:
their weights are still plain safetensors / DeepSpeed files, but this version does not resume them.

The data position needs no state of its own: the drivers derive the order of epoch e from
`seed + e`, so the step count fixes where the data stream continues.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fastalign.errors import CheckpointFormatError
from fastalign.files import DiskFullError, apply_umask, writing
from fastalign.trainers.runtime import Runtime, Trainable

FORMAT = 2
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (torn `.tmp` folders are not listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def read_state(path: str | Path) -> dict[str, Any]:
    with open(Path(path) / STATE_FILE) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    # the legacy global numpy RNG: user code (reward functions, collators) may draw from it
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def save(
    output_dir: str | Path,
    step: int,
    rt: Runtime,
    trainables: Sequence[Trainable],
    state: Mapping[str, Any],
    keep_last: int,
    extra: Mapping[str, Stateful] | None = None,
) -> Path:
    """Write checkpoint `step` (collective under ZeRO: every rank calls it) and prune to the newest
    `keep_last`. `state` goes into trainer_state.json. Returns the checkpoint folder."""
    tmp = _prepare(output_dir, step) if rt.is_main else None
    rt.barrier()
    tmp = tmp or checkpoint_root(output_dir) / f"step-{step:08d}.tmp"
    found = list_checkpoints(output_dir)
    note = f" (the earlier checkpoint {found[-1]} is intact)" if found else ""
    try:
        with writing(tmp, note):
            for t in trainables:
                t.save(tmp / t.name)
            torch.save(rng_state(), tmp / f"rng_rank{rt.rank}.pt")
            rt.barrier()  # every rank's files are in tmp before rank 0 renames it
            if rt.is_main:
                if extra:
                    torch.save({k: v.state_dict() for k, v in extra.items()}, tmp / EXTRA_FILE)
                full = {"step": step, "format": FORMAT, "world_size": rt.world, **state}
                _commit(output_dir, step, tmp, full, keep_last)
    except DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the torn folder is no checkpoint
        raise
    rt.barrier()
    return step_dir(output_dir, step)


def _prepare(output_dir: str | Path, step: int) -> Path:
    """A fresh, empty `step-N.tmp/` folder to write checkpoint `step` into."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(output_dir: str | Path, step: int, tmp: Path, state: dict[str, Any], keep_last: int) -> None:
    """Write trainer_state.json into `tmp`, rename it to `step-N` and prune to `keep_last`."""
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    apply_umask(tmp)  # safetensors writes 0600 files; a checkpoint follows the umask like any output
    final = step_dir(output_dir, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        _remove(old)


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
            _STEP_DIR.match(p.name) and not (p / STATE_FILE).is_file()
        )
        if torn:
            shutil.rmtree(p, ignore_errors=True)


def remove_all(output_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def find_resume_point(output_dir: str | Path, resume: str, clean: bool = True) -> Path | None:
    """`resume`: "auto" (latest complete checkpoint, if any), "never", or a checkpoint folder.
    `clean`: remove what a killed run left half-written first (rank 0 only under a launcher)."""
    if resume == "never":
        return None
    if resume == "auto":
        if clean:
            clean_torn(output_dir)
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r}: not a checkpoint folder (expected {path}/{STATE_FILE})"
        )
    return path


def check_loadable(path: str | Path, world: int) -> dict[str, Any]:
    """trainer_state.json of `path` if this version can resume it on `world` ranks, else a
    CheckpointFormatError saying why and what to do."""
    path = Path(path)
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"{path} was written by an earlier fastalign (checkpoint layout {state.get('format', 1)}, this "
            f"version reads layout {FORMAT}) and is not resumed. Start over with train.resume=never (or "
            "another train.output_dir); the old folder's weights stay readable with safetensors / DeepSpeed."
        )
    if state.get("world_size", 1) != world:
        raise CheckpointFormatError(
            f"{path}: written by {state.get('world_size', 1)} rank(s), now {world}; exact resume needs the "
            "same number of ranks (each rank's data slice differs)"
        )
    return state


def load(
    path: str | Path,
    rt: Runtime,
    trainables: Sequence[Trainable],
    extra: Mapping[str, Stateful] | None = None,
) -> dict[str, Any]:
    """Restore what `save` wrote (collective under ZeRO); returns trainer_state.json."""
    path = Path(path)
    state = check_loadable(path, rt.world)
    for t in trainables:
        t.load(path / t.name)
    if extra:
        saved = torch.load(path / EXTRA_FILE, weights_only=True) if (path / EXTRA_FILE).is_file() else {}
        for k, obj in extra.items():
            if k in saved:
                obj.load_state_dict(saved[k])
    rng = path / f"rng_rank{rt.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return state
