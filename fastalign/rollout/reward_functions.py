"""Reward functions by name: "package.module:function" or "path/to/file.py:function" (the file is
user code, run as such: a config naming one is as powerful as code), and the check of what they
return (N finite floats)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastalign.files import describe_missing


def load_reward_function(spec: str) -> Callable[..., Sequence[float]]:
    """The callable named by "package.module:function" or "path/to/file.py:function"."""
    where = f"reward.function {spec!r}"
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target.strip() or not name.strip():
        raise ValueError(f"{where}: expected 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(Path(target).expanduser(), where)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"{where}: cannot import module {target!r} ({e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{where}: module {target!r} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"{where}: {name!r} is a {type(fn).__name__}, not a callable")
    return fn


def _module_from_file(path: Path, where: str):
    if not path.is_file():
        raise ValueError(f"{where}: file {describe_missing(path)} not found")
    module_name = "fastalign_reward_fn_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{where}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses / pickling inside the file need it registered
    spec.loader.exec_module(module)
    return module


def check_scores(values: Any, name: str, n: int) -> list[float]:
    """`values` as N finite floats, else ValueError naming the function, index and value."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(
            f"reward function {name}: returned {type(values).__name__}, expected a list of {n} floats"
        )
    if len(values) != n:
        raise ValueError(f"reward function {name}: returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"reward function {name}: value {i} is {v!r}, expected a finite float")
        out.append(float(v))
    return out
