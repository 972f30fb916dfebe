"""Packaging and project-shape checks that would catch a broken install or CI wiring."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_fastalign_is_light():
    code = "import sys, fastalign; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kernels_live_under_fastalign_not_top_level(tmp_path):
    spec = importlib.util.find_spec("fastalign.kernels")
    assert spec is not None and Path(spec.origin).resolve().parent == ROOT / "kernels"
    # The installed package must not expose a top-level `kernels` (transformers probes for Hugging
    # Face's package of that name). Probe from a directory outside the checkout.
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    origin = out.stdout.strip()
    assert origin == "None" or not origin.startswith(str(ROOT)), origin


def test_cpp_sources_ship_with_the_package():
    import fastalign.csrc

    src = Path(fastalign.csrc.__file__).parent
    from fastalign.ops import _cpp

    for name in _cpp._SOURCES + _cpp._HEADERS:
        assert (src / name).is_file(), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(bash scripts/\S+\.sh)\s*$", quick, flags=re.M)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in commands and "bash scripts/test.sh" in ci
