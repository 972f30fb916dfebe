"""Small file-system helpers shared by every layer (no torch, no fastalign imports)."""

from __future__ import annotations

import os
from pathlib import Path


def describe_missing(path: str | os.PathLike) -> str:
    """`path` quoted, plus the directory a relative path was resolved from, for 'not found' errors:
    configs name paths relative to the current directory, and a user who ran from elsewhere needs
    to see which directory that was."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_absolute():
        return repr(text)
    return f"{text!r} (relative to the current directory {os.getcwd()})"
