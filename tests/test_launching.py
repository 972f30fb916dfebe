"""The multi-process tests' launch helper kills the whole process group on a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from launching import run_launch


def test_a_timed_out_launch_leaves_no_orphans(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_launch([sys.executable, "-c", script], env=dict(os.environ), timeout=3)
    assert time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    assert _dead(child), "the grandchild (a rank) outlived its launcher"


def _dead(pid: int, wait_s: float = 5.0) -> bool:
    """Gone, or a zombie waiting for init to reap it (killed all the same)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_finished_launch_returns_its_output():
    done = run_launch(
        [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], env=dict(os.environ), timeout=30
    )
    assert done.returncode == 3 and done.stdout.strip() == "out"
