"""Package attributes imported on first use (PEP 562), so that `import fastalign.engine` or
`import fastalign.models` loads neither torch nor DeepSpeed: the CLI imports them at startup."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) for `package`, whose public name `n` lives in the
    submodule `exports[n]`. Usage in the package's `__init__.py`:

        __getattr__, __dir__, __all__ = lazy_exports(__name__, {"load_causal_lm": "causal_lm"})
    """
    names = sorted(exports)

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return __getattr__, __dir__, names
