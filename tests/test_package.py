"""Packaging and project-shape checks that would catch a broken install or CI wiring."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_without_a_compiler_one_warning_and_the_torch_backend(tmp_path):
    code = (
        "import warnings, torch\n"
        "from fastalign.ops import token_logprobs\n"
        "from fastalign.ops._backend import resolve_backend\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    picks = [resolve_backend('auto', torch.device('cpu'), 'op') for _ in range(3)]\n"
        "    out = token_logprobs(torch.zeros(2, 4), torch.tensor([1, -100]))\n"
        "msgs = [str(w.message) for w in caught if 'C++ CPU kernels' in str(w.message)]\n"
        "print(picks, len(msgs), round(out[0].item(), 4))\n"
        "print(msgs[0].splitlines()[0][:60] if msgs else '')\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "FASTALIGN_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("FASTALIGN_DISABLE_CPP", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()
    assert first == "['torch', 'torch', 'torch'] 1 -1.3863", out.stdout
    assert second.startswith("fastalign: could not build the C++ CPU kernels")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / name for name in out.decode().split("\0") if name]
    return [f for f in files if f.is_file() and f.suffix not in {".safetensors", ".model", ".png"}]


def test_no_tracked_file_names_a_path_outside_the_repository():
    """Users clone the repository and nothing beside it (assets/ holds the model and data)."""
    dots = ".."  # the patterns are assembled so that this file does not match itself
    shared = re.compile(re.escape(dots + "/shared") + r"|\.parent\s*/\s*[\"']shared[\"']")
    climb = re.compile(r"parents\[\d+\]\.parent\b")  # climbing above the checkout root in Python
    relative = re.compile(r"(?:^|[\s\"'=(:,\[])((?:" + re.escape(dots + "/") + r")+[\w.-][^\s\"'`),\]]*)")
    machine = re.compile("/work" + r"/shared\b")  # this workplace's folder beside the checkout
    hits = []
    for f in _tracked_text_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            bad = shared.search(line) or climb.search(line) or machine.search(line)
            for m in relative.finditer(line):  # a relative path is fine while it stays inside
                target = (f.parent / m.group(1)).resolve()
                bad = bad or not target.is_relative_to(ROOT)
            if bad:
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_assets_ship_with_licences_and_stay_out_of_the_wheel(tmp_path):
    assets = ROOT / "assets"
    assert (assets / "models" / "stories260k" / "LICENSE").is_file()
    assert (assets / "models" / "stories260k" / "model.safetensors").stat().st_size > 1_000_000
    for name in ("LICENSE.pandalm", "LICENSE.open-assistant"):
        assert (assets / "data" / "preferences" / name).is_file()
    rows = (assets / "data" / "preferences" / "pandalm_testset_v1.jsonl").read_text().splitlines()
    assert len(rows) == 894
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools not installed in this environment")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("fastalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("fastalign/") for n in names)
    assert not [n for n in names if n.startswith("assets/") or "stories260k" in n or n.endswith(".jsonl")]
