"""The one validation helper every config section uses (torch-free, no fastalign imports)."""

from __future__ import annotations

import math
import warnings


def require(ok: bool, key: str, msg: str) -> None:
    """Raise the validation error for `key` (relative to its section; the loader prefixes it)."""
    if not ok:
        raise ValueError(f"{key}: {msg}")


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class ConfigWarning(UserWarning):
    """A setting that is valid but probably not what the user meant."""


def warn(msg: str) -> None:
    warnings.warn(msg, ConfigWarning, stacklevel=3)
