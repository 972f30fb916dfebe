"""The C++ build: announced on stderr when it really compiles (not when the cache holds it), and
cached beside the virtual environment whatever starts fastalign."""

from __future__ import annotations

import sys
import types

import pytest

from fastalign.ops import _cpp


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """_cpp.load with a fake compiler writing into a temporary cache folder."""
    calls = []

    def fake_load(name, build_directory, **kwargs):
        calls.append(name)
        (tmp_path / name / f"{name}.so").write_bytes(b"")  # what a real build leaves
        return types.SimpleNamespace(__file__=f"{build_directory}/{name}.so")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("FASTALIGN_EXTENSIONS_DIR", str(tmp_path))
    _cpp.load.cache_clear()
    yield calls
    _cpp.load.cache_clear()


def test_a_build_is_announced_and_a_cached_one_is_not(fresh_load, capsys, tmp_path):
    _cpp.load()
    err = capsys.readouterr().err
    assert "building the C++ CPU kernels" in err and str(tmp_path) in err and "built in" in err
    _cpp.load.cache_clear()
    _cpp.load()  # the .so is in the cache now
    assert capsys.readouterr().err == ""
    assert len(fresh_load) == 2  # torch's loader still runs (it only imports a cached build)


def test_cache_folder_follows_the_virtual_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTALIGN_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert _cpp._cache_dir() == tmp_path / "venv" / "torch_extensions"
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "venv"))  # not a virtual environment
    assert _cpp._cache_dir().parts[-3:] == (".cache", "fastalign", "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "t"))
    assert _cpp._cache_dir() == tmp_path / "t" / "fastalign"
    monkeypatch.setenv("FASTALIGN_EXTENSIONS_DIR", str(tmp_path / "f"))
    assert _cpp._cache_dir() == tmp_path / "f"
