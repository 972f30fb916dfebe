"""What a run is: its resolved config and the content of every model and data file it reads.

`fingerprint(cfg)` is recorded in the run folder (`fingerprint.json`) and in every checkpoint;
resuming compares the checkpoint's with the new one (`compare`). Content hashes are sha256 of the
files' bytes (`fastalign.files.file_sha256`, cached per file version), so a model folder retrained
in place or a data file edited under the same name is seen as changed.

Keys in RESUME_FREE may change when a run is resumed (they change how long it runs or what it
reports, not what a step computes); a change to any other key, to a model's weights or to a data
file is refused unless the user names it in `train.accept_changes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fastalign.config import config_to_dict
from fastalign.files import tree_sha256
from fastalign.models import resolve_model_path

RESUME_FREE = frozenset({
    "train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every",
    "train.keep_last", "train.progress", "train.tensorboard", "train.resume", "train.export",
    "train.export_dtype", "train.threads", "train.device", "train.output_dir", "train.eval_batch_size",
    "train.accept_changes", "engine.memory_limit_gb",
})  # fmt: skip
"""Keys a resumed run may change freely (documented in docs/quickstart.md)."""

# files of a model folder that define the model: weights, config, tokenizer
MODEL_FILES = (".safetensors", ".gguf", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken")


def flat(cfg: Any) -> dict[str, Any]:
    """{dotted key: value} of a recipe config (lists and dicts are values)."""
    out: dict[str, Any] = {}

    def walk(d: Mapping, prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and k != "columns" and k != "function_kwargs":
                walk(v, key + ".")
            else:
                out[key] = v

    walk(config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def _model_paths(cfg: Any) -> Iterator[tuple[str, str, str | None]]:
    """(key, model reference, gguf file) of every model the recipe loads."""
    yield "model.path", cfg.model.path, cfg.model.gguf_file
    section = getattr(cfg, getattr(type(cfg), "method", "").replace("-", "_"), None)
    if getattr(section, "reference", None):
        yield f"{type(cfg).method.replace('-', '_')}.reference", section.reference, None
    for i, m in enumerate(getattr(getattr(cfg, "reward", None), "models", ()) or ()):
        yield f"reward.models[{i}]", m, None
    if getattr(section, "value_path", None):
        yield "ppo.value_path", section.value_path, None


def model_sha256(path: str, gguf_file: str | None = None) -> str:
    """Content hash of the model a reference resolves to (its .gguf, or the folder's weights,
    config and tokenizer files)."""
    folder, gguf = resolve_model_path(path, gguf_file)
    if gguf is not None:
        return tree_sha256(Path(folder) / gguf)
    return tree_sha256(folder, MODEL_FILES)


def _data_paths(cfg: Any) -> Iterator[tuple[str, str]]:
    data = cfg.data
    for key in ("train", "eval"):
        value = getattr(data, key, None)
        if value:
            yield f"data.{key}", value
    fn = getattr(getattr(cfg, "reward", None), "function", None)
    if fn and ":" in fn and fn.rpartition(":")[0].endswith(".py"):
        yield "reward.function", fn.rpartition(":")[0]


def fingerprint(cfg: Any) -> dict[str, Any]:
    """{"config": flat resolved config, "files": {key: sha256 of what it names}}. A data source that
    is not a local file or folder (a hub dataset name) is recorded by name only."""
    files: dict[str, str] = {}
    for key, path, gguf in _model_paths(cfg):
        files[key] = model_sha256(path, gguf)
    for key, path in _data_paths(cfg):
        p = Path(path).expanduser()
        files[key] = tree_sha256(p) if p.exists() else f"name:{path}"
    return {"config": flat(cfg), "files": files}


@dataclasses.dataclass
class Change:
    key: str
    old: Any
    new: Any
    free: bool  # in RESUME_FREE

    def describe(self) -> str:
        if self.key.startswith("file:"):
            return f"{self.key[5:]} (content): changed (sha256 {str(self.old)[:12]} -> {str(self.new)[:12]})"
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every difference between two fingerprints (config keys, then file contents)."""
    out = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for key in sorted(set(oc) | set(nc)):
        if oc.get(key) != nc.get(key):
            out.append(Change(key, oc.get(key), nc.get(key), key in RESUME_FREE))
    of, nf = old.get("files", {}), new.get("files", {})
    for key in sorted(set(of) | set(nf)):
        if of.get(key) != nf.get(key) and not (nc.get(key) != oc.get(key) and key in nc):
            out.append(Change(f"file:{key}", of.get(key), nf.get(key), False))
    return out


def refused(changes: list[Change], accepted: list[str]) -> list[Change]:
    """The changes that stop a resume: not free, and not named in `train.accept_changes` (a key,
    or "all"). A path key (`model.path`) accepts its file content too."""
    if "all" in accepted:
        return []
    return [c for c in changes if not c.free and c.key.removeprefix("file:") not in accepted]
