"""Process group setup and rank helpers that work with and without a launcher.

`init_distributed` is idempotent and always sets a timeout (env FASTALIGN_DIST_TIMEOUT, default
300 s): a rank that dies makes the others fail at their next collective instead of waiting
forever. Without a launcher (no RANK / WORLD_SIZE) it starts a one-process group on 127.0.0.1, so
the same code path runs in a plain `python` call.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


def _timeout_s() -> float:
    raw = os.environ.get("FASTALIGN_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FASTALIGN_DIST_TIMEOUT: expected seconds (a number), got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"FASTALIGN_DIST_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """`deepspeed.init_distributed` with gloo on CPU / nccl on CUDA (or `backend`), once."""

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # plain `python`: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=_timeout_s())
    )


def _initialized() -> bool:

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group: from $RANK, else 0)."""
    if _initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if _initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 writes logs, checkpoints' metadata and exports."""
    return rank() == 0


def barrier() -> None:
    """All ranks wait here (no-op without a process group); bounded by the group timeout."""
    if _initialized():
        dist.barrier()
