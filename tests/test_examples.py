"""The example scripts run end to end on the real tiny Llama (stories260k) and real preference pairs.

Each runs as a subprocess, exactly as a user would launch it (offline, from the repo root), so the
test also catches import-path and argument-parsing breakage, not only loss numerics.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = (ROOT / "assets/models/stories260k").resolve()
DATA = (ROOT / "assets/data/preferences/pandalm_testset_v1.jsonl").resolve()
LOSS_LINE = re.compile(r"^step \d+ loss (-?\d+\.\d+|nan|inf)", re.MULTILINE)

# script -> the optional package it needs beyond transformers (skip if missing)
EXAMPLES = {"plain_loop_dpo.py": None, "hf_trainer_dpo.py": None, "trl_dpo_trainer.py": "trl"}


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script):
    pytest.importorskip("transformers", reason="examples need transformers")
    if EXAMPLES[script]:
        pytest.importorskip(EXAMPLES[script], reason=f"{script} needs {EXAMPLES[script]}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # conftest sets it for kernel tests; the examples run natively
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--steps", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    steps = LOSS_LINE.findall(proc.stdout)
    assert len(steps) == 2, f"expected 2 'step N loss X' lines from {script}, got:\n{proc.stdout}"
    assert "nan" not in steps and "inf" not in steps, proc.stdout
