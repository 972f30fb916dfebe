"""Config loading: a recipe dataclass tree filled from YAML plus dotted overrides.

    cfg = load_config(DPORecipe, "configs/dpo.yaml", ["train.lr=1e-5", "model.gguf_file=null"])

Why a hand-rolled loader rather than OmegaConf / Hydra: the rules are few and the errors matter more
than the features. Every value is type-checked against the dataclass annotation, and every error says
*which* dotted key, *where* the value came from (the YAML file or an override) and what was expected:

    train.lr: expected float, got 'abc' (str) [from override]
    Unknown key 'train.lrr' [in cfg.yaml]; did you mean 'train.lr'?

YAML is read with `yaml.safe_load` (never evaluated). Two YAML 1.1 quirks are handled on purpose:
`1e-5` (no dot) loads as a string, so a float field accepts any string that parses as a float; and
unquoted `no` / `yes` / `on` / `off` load as booleans, so an override's raw text is used for string
fields (`train.mixed_precision=no` works), while in a file the error tells you to quote it.

Overrides apply after the file, in order. An override naming a whole section
(`model.lora={r: 8}`) replaces that section: its unnamed fields take their defaults.
After loading, every dataclass's `validate()` runs (cross-field and range checks).

Kept import-light: no torch at import (the CLI imports this at startup).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from fastalign.files import describe_missing

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# type checking / coercion
# ---------------------------------------------------------------------------------------------
_NO_TEXT = object()  # "no raw override text available" (values from a YAML file)


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (annotations are strings here)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not fit a type; the loader turns it into the user-facing message."""

    def __init__(self, key: str, expected: Any, value: Any, hint: str = "") -> None:
        super().__init__(key)
        self.key, self.expected, self.value, self.hint = key, expected, value, hint


def _yaml_bool_hint(value: Any, text: Any) -> str:
    if isinstance(value, bool) and text is _NO_TEXT:
        return " (YAML reads unquoted no/yes/on/off/true/false as booleans: quote the value, e.g. 'no')"
    return ""


def _coerce(value: Any, tp: Any, key: str, text: Any = _NO_TEXT, where: str = "") -> Any:
    """Check `value` against annotation `tp` and return it in that type; raise _Mismatch (or
    ValueError for unknown keys inside a section). `text` is the raw override string, used for
    string-typed fields where YAML turned `no` / `123` into a bool / number."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, text, where)
            except _Mismatch as exc:
                errors.append(exc)
        raise _Mismatch(key, tp, value, next((e.hint for e in errors if e.hint), ""))
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        if isinstance(text, str) and text.strip() in choices:
            return text.strip()
        raise _Mismatch(key, tp, value, _yaml_bool_hint(value, text))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML 1.1 leaves "1e-5" as a string
            except ValueError:
                pass
        raise _Mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(text, str) and value is not None and not isinstance(value, (list, dict)):
            return text.strip()  # override `x=no` / `x=123` meant the string
        raise _Mismatch(key, tp, value, _yaml_bool_hint(value, text))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Mismatch(key, tp, value)
        return [_coerce(v, item_tp, f"{key}[{i}]", where=where) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise _Mismatch(key, tp, value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Mismatch(f"{key}.{k}", key_tp, k, " (keys must be strings)")
            out[k] = _coerce(v, val_tp, f"{key}.{k}", where=where)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch(key, tp, value)
        return _build(tp, value, key, where)
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r} in the config schema")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of a dataclass tree (sections and leaves)."""
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


class _Unknown(Exception):
    """Internal: a key the schema does not have; the loader adds the source and a suggestion."""

    def __init__(self, key: str, where: str) -> None:
        super().__init__(key)
        self.key, self.where = key, where


def _unknown_key(key: str, where: str, root: type) -> ValueError:
    """Suggest the closest valid key: a sibling with a similar name ("train.lrr" -> "train.lr"),
    else any key with a similar full path ("trian.lr" -> "train.lr"); else list the siblings."""
    candidates = _all_keys(root)
    parent, _, tail = key.rpartition(".")
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    by_tail = {c.rpartition(".")[2]: c for c in siblings}
    close = [by_tail[t] for t in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)]
    if not close:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    if close:
        return ValueError(f"Unknown key {key!r} [{where}]; did you mean {close[0]!r}?")
    listing = f" Valid keys here: {', '.join(siblings)}." if siblings else ""
    return ValueError(f"Unknown key {key!r} [{where}].{listing}")


def _build(cls: type, raw: Mapping, prefix: str, where: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _Unknown(key, where)
        kwargs[name] = _coerce(value, hints[name], key, where=where)
    return cls(**kwargs)


def _mismatch_error(exc: _Mismatch, where: str) -> ValueError:
    v = exc.value
    shown = repr(v) if not isinstance(v, (dict, list)) or len(repr(v)) <= 60 else repr(v)[:57] + "..."
    expected = _type_name(exc.expected)
    return ValueError(f"{exc.key}: expected {expected}, got {shown} ({type(v).__name__}) [{where}]{exc.hint}")


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------
def _parse_override(item: str) -> tuple[str, Any, str]:

    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"Override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-5")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(
            f"Override {item!r}: empty key (or empty part in a dotted key); expected e.g. train.lr=1e-5"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"Override {item!r}: the value is not valid YAML ({exc})") from None
    return key, value, text


def _apply_override(cfg: Any, key: str, value: Any, text: str, item: str) -> None:
    where = "from override"
    parts = key.split(".")
    obj, done = cfg, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join([*done, part])
        if dataclasses.is_dataclass(obj):
            hints = _hints(type(obj))
            if part not in hints:
                raise _Unknown(path if last else key, where)
            if last:
                setattr(obj, part, _coerce(value, hints[part], path, text, where))
                return
            child_tp, child = hints[part], getattr(obj, part)
            if typing.get_origin(child_tp) is dict:
                # dict field: the rest of the key (may contain dots) names one entry
                entry = ".".join(parts[i + 1 :])
                _, val_tp = typing.get_args(child_tp)
                child[entry] = _coerce(value, val_tp, key, text, where)
                return
            if not dataclasses.is_dataclass(child):
                raise ValueError(
                    f"Override {item!r}: {path} is a value ({_type_name(child_tp)}), not a section; "
                    f"it has no key {parts[i + 1]!r}"
                )
            obj = child
        done.append(part)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _validate_tree(obj: Any, prefix: str, where: str) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child, f"{prefix}{f.name}.", where)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as exc:
            raise ValueError(f"{prefix}{exc} [{where}]") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build recipe `cls` from the YAML mapping at `path` (optional) and dotted `overrides`
    ("train.lr=1e-5", "data.columns.prompt=question", "model.lora.target_modules=[q_proj,v_proj]",
    "model.gguf_file=null"), then run every section's validate(). Raises FileNotFoundError for a
    missing file, ValueError (naming key, source and expectation) for anything else wrong."""

    if isinstance(overrides, str):
        overrides = [overrides]
    raw: Any = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = f"in {path}"
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {describe_missing(path)}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"{path}: expected a YAML mapping of sections (model:, data:, train:, ...) at the top level, "
                f"got {type(raw).__name__}"
            )
    recipe_method = getattr(cls, "method", None)
    raw = dict(raw)
    if "method" in raw and "method" not in _hints(cls):
        method = raw.pop("method")
        if method != recipe_method:
            raise ValueError(
                f"method: this config is for {method!r} but is being loaded as the {recipe_method!r} recipe "
                f"[{where}]"
            )
    try:
        cfg = _build(cls, raw, "", where)
    except _Mismatch as exc:
        raise _mismatch_error(exc, where) from None
    except _Unknown as exc:
        raise _unknown_key(exc.key, exc.where, cls) from None
    parsed = [_parse_override(item) for item in overrides]
    for item, (key, value, text) in zip(overrides, parsed, strict=True):
        if key == "method" and "method" not in _hints(cls):
            if value != recipe_method:
                raise ValueError(f"Override {item!r}: the recipe is {recipe_method!r}, not {value!r}")
            continue
        try:
            _apply_override(cfg, key, value, text, item)
        except _Mismatch as exc:
            raise _mismatch_error(exc, "from override") from None
        except _Unknown as exc:
            raise _unknown_key(exc.key, exc.where, cls) from None
    if overrides:
        where = f"{where} + overrides" if path is not None else "from overrides"
    _validate_tree(cfg, "", where)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON-ready); a recipe's `method` comes first."""
    out: dict = {}
    method = getattr(type(cfg), "method", None)
    if isinstance(method, str) and "method" not in _hints(type(cfg)):
        out["method"] = method
    out.update(dataclasses.asdict(cfg))
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write `cfg` as YAML; `load_config(type(cfg), path)` gives an equal config back."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# self-description (`fastalign <recipe> --help`)
# ---------------------------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """{field: its one-line meaning} from the string literal under each field in the class source
    (and its bases'), so the help text lives beside the field and cannot drift from it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _yaml_text(value: Any) -> str:
    """A value as it would be written in the YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def describe_keys(cls: type, prefix: str = "", obj: Any = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every leaf key of a recipe / section, in order."""
    obj = cls() if obj is None else obj
    hints, docs = _hints(cls), field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_keys(tp, key + ".", getattr(obj, f.name))
        else:
            rows.append((key, _type_name(tp), _yaml_text(getattr(obj, f.name)), docs.get(f.name, "")))
    return rows
