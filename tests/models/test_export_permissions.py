"""Exports follow the process umask (issue 16): before, a folder written through `atomic_folder`
was `drwx------` (tempfile.mkdtemp) with a `-rw-------` model.safetensors (safetensors' writer)
whatever the umask, so a 022 umask's colleagues could not read a finished model."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from repo_assets import ASSETS

from fastalign.files import apply_umask, process_umask
from fastalign.models import ValueHeadModel, load_causal_lm, load_tokenizer, save_pretrained
from fastalign.models.export import atomic_folder

MODEL = ASSETS / "models" / "stories260k"


@pytest.fixture
def umask(request) -> Iterator[int]:
    """Run the test under the parametrized umask; the previous one is restored afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of root and everything under it."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def _assert_umask_modes(root: Path, mask: int) -> None:
    modes = _modes(root)
    assert len(modes) > 3, modes  # a real export: config, weights, tokenizer files
    for name, mode in modes.items():
        want = (0o777 if (root / name).is_dir() else 0o666) & ~mask
        assert mode == want, f"{name}: {oct(mode)} != {oct(want)} under umask {oct(mask)} ({modes})"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027], indirect=True, ids=["022", "077", "027"])
def test_process_umask_reads_without_changing_it(umask):
    assert process_umask() == umask
    assert process_umask() == umask  # still the same: reading did not reset it


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["022", "077"])
def test_save_pretrained_follows_the_umask(tmp_path, umask):
    model, tok = load_causal_lm(str(MODEL), dtype="float32"), load_tokenizer(str(MODEL))
    out = save_pretrained(model, tok, tmp_path / "runs" / "final")
    assert (out / "model.safetensors").is_file()
    _assert_umask_modes(out, umask)
    # replacing an existing export: the new folder has the umask's modes too
    out = save_pretrained(ValueHeadModel(model), tok, out)
    assert (out / "value_head.safetensors").is_file()  # written by safetensors' save_file (0600)
    _assert_umask_modes(out, umask)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["022", "077"])
def test_engine_export_hf_follows_the_umask(tmp_path, umask):
    """The ZeRO export path (`fastalign.engine.export_hf`), here on a plain one-process model."""
    from fastalign.engine.export import export_hf

    model, tok = load_causal_lm(str(MODEL), dtype="float32"), load_tokenizer(str(MODEL))
    out = export_hf(model, tok, tmp_path / "hf", dtype="bfloat16")
    assert (out / "model.safetensors").is_file()
    _assert_umask_modes(out, umask)


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=["022"])
def test_apply_umask_keeps_execute_bits_and_never_follows_links(tmp_path, umask):
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the export")
    outside.chmod(0o600)
    with atomic_folder(tmp_path / "export", "test") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "sub" / "run.sh").chmod(0o700)
        (tmp / "data.bin").write_bytes(b"x")
        (tmp / "data.bin").chmod(0o600)
        (tmp / "link").symlink_to(outside)
    out = tmp_path / "export"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "sub" / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "data.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # the link's target was left alone
    apply_umask(out)  # idempotent
    assert stat.S_IMODE((out / "data.bin").stat().st_mode) == 0o644
