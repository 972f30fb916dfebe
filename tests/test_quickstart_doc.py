"""docs/quickstart.md's commands run as written (sections 0-3), shortened to 3 steps each.

Each `fastalign ...` line gets `train.max_steps=3 ...` appended; everything else is verbatim, so
a renamed key, a missing config or a wrong data format in the doc fails here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORTEN = " train.max_steps=3 train.eval_every=0 train.save_every=0 train.tensorboard=false"


def _blocks() -> list[str]:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    body = text.split("## 0.", 1)[1].split("## What a run leaves behind", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def _shorten(block: str) -> str:
    joined = block.replace("\\\n", " ")
    out = []
    in_heredoc = False
    for line in joined.splitlines():
        if in_heredoc:
            in_heredoc = line.strip() != "EOF"
        elif "<<'EOF'" in line:
            in_heredoc = True
        elif line.startswith("fastalign "):
            line = line.split("  #", 1)[0] + SHORTEN
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.slow
def test_quickstart_commands_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "assets").symlink_to(ROOT / "assets")
    script = "set -euo pipefail\n" + "".join(_shorten(b) for b in _blocks())
    assert script.count("fastalign ") >= 5
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the venv's `fastalign`
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path}
    res = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "runs" / "my_sft" / "final" / "model.safetensors").exists()
    assert (work / "runs" / "my_rm" / "final" / "model.safetensors").exists()
    assert (work / "runs" / "my_dpo" / "final" / "model.safetensors").exists()
