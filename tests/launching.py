"""What the multi-process tests share: a free port, the CPU/gloo environment of a launch, and a
run that cannot leave orphans — the launcher gets its own session and on a timeout the whole
process group (launcher and ranks) is killed; `subprocess.run(timeout=...)` would kill the
launcher alone and leave hung ranks burning the CI machine's cores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(
    *, timeout_s: int = 120, debug: bool = True, pythonpath: Sequence[Path] = (ROOT,)
) -> dict[str, str]:
    """os.environ plus DeepSpeed on CPU (gloo), one OpenMP thread per rank, offline hub, the
    process-group timeout, and the cached JIT ops (shm comm, CPU Adam) in the venv."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        FASTALIGN_DIST_TIMEOUT=str(timeout_s),
        # tests/ for the helpers every worker shares (repo_assets: the shipped model and data)
        PYTHONPATH=os.pathsep.join(str(p) for p in (*pythonpath, ROOT / "tests")),
    )
    if debug:
        env["FASTALIGN_DEBUG"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions_ds"))
    return env


def run_launch(cmd: Sequence[str], *, env: dict[str, str], timeout: float, cwd: Path = ROOT):
    """subprocess.run(cmd, capture_output=True, text=True) in its own session; on a timeout the
    process group is killed, then subprocess.TimeoutExpired is raised as usual."""
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
