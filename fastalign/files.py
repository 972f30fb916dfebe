"""Small file-system helpers shared by every layer (no torch, no fastalign imports)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def describe_missing(path: str | os.PathLike) -> str:
    """`path` quoted, plus the directory a relative path was resolved from, for 'not found' errors:
    configs name paths relative to the current directory, and a user who ran from elsewhere needs
    to see which directory that was."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_absolute():
        return text
    return f"{text} (relative to the current directory {os.getcwd()})"


# ---------------------------------------------------------------------------------------------
# content hashes (run fingerprints, the reference log-prob cache)
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """fastalign's per-user cache ($FASTALIGN_CACHE, else $XDG_CACHE_HOME/fastalign, else
    ~/.cache/fastalign)."""
    root = os.environ.get("FASTALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastalign"
    )
    return Path(root)


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes. Remembered per (real path, size, mtime, inode) in
    `cache_dir()/file_hashes.json`, so a file is read once per version: hashing costs ~1.5-7 s
    per GB on these 2-core machines (measured 6.6 s/GB under load), paid on a model's first use."""
    path = Path(path)
    key = _stat_key(path)
    store = cache_dir() / "file_hashes.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    known[key] = digest
    try:  # a cache: losing a write to a concurrent run or a read-only home only costs a re-hash
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, store)
    except OSError:
        pass
    return digest


def tree_sha256(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> str:
    """One sha256 over a file, or over every file of a folder (relative names + contents, sorted;
    only names ending in `suffixes` when given), so a changed, added or removed file changes it."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if suffixes is None or f.name.endswith(suffixes):
            h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class DiskFullError(OSError):
    """The device ran out of space (or quota) while fastalign was writing."""


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_full(exc: BaseException, path: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save and safetensors report a full disk as a C++ stream error, without an errno
    text = str(exc).lower()
    if any(s in text for s in ("no space left", "iostream error", "failed writing", "disk quota")):
        return True
    try:
        return shutil.disk_usage(_existing_parent(path)).free < 1 << 20
    except OSError:
        return False


@contextmanager
def writing(path: str | os.PathLike, note: str = "") -> Iterator[None]:
    """Turn a full disk under the block into one DiskFullError naming `path` (+ `note`, e.g. that
    the earlier checkpoint is intact) instead of "basic_ios::clear: iostream error"."""
    try:
        yield
    except Exception as exc:  # torch: RuntimeError; safetensors: SafetensorError (an Exception)
        if isinstance(exc, DiskFullError) or not _disk_full(exc, Path(path)):
            raise
        raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}{note}") from exc


# ---------------------------------------------------------------------------------------------
# permissions
# ---------------------------------------------------------------------------------------------
def process_umask() -> int:
    """The process umask. Read from /proc/self/status (Linux >= 4.7) where there is one: the
    portable way, `os.umask` set-and-restore, briefly changes it for every thread."""
    try:
        m = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), flags=re.M)
    except OSError:
        m = None
    if m is not None:
        return int(m.group(1), 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the permissions a plain `mkdir` / `open(..., "w")`
    would have had under the current umask: folders 0o777 & ~umask, files 0o666 & ~umask (0o777
    & ~umask when the file has an execute bit). Symbolic links are left alone (Linux cannot
    chmod a link, and following one could change a file outside `root`)."""
    mask = process_umask()
    folder_mode, file_mode, exec_mode = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    root = Path(root)
    os.chmod(root, folder_mode)
    for here, folders, files in os.walk(root):
        for name in folders:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, exec_mode if st.st_mode & 0o111 else file_mode)
