"""JIT build and load of the C++ (ATen + OpenMP) CPU kernels in csrc/.

Built once per machine into a cache directory ($FASTALIGN_EXTENSIONS_DIR, else
$TORCH_EXTENSIONS_DIR/fastalign, else `<virtual environment>/torch_extensions` when Python runs
in one — the same folder whether fastalign is started by the scripts, the CLI or an import —
else ~/.cache/fastalign/torch_extensions). The extension's name carries a hash of the sources,
torch version and CPU model, so a stale or foreign build is never loaded. A build (about a minute
on 2 cores) is announced on stderr with the folder, and so is its end. Without a working C++
compiler, `available()` is False, one warning explains why, and `backend="auto"` falls back to
the PyTorch backend.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

_SOURCES = ("bindings.cpp", "token_logprobs.cpp", "linear_logprobs.cpp", "gae.cpp")
_HEADERS = ("common.h",)
_build_error: str | None = None


def _source_dir() -> Path:
    import fastalign.csrc  # a package of C++ sources only: located on use

    return Path(fastalign.csrc.__file__).parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    if os.environ.get("FASTALIGN_EXTENSIONS_DIR"):
        return Path(os.environ["FASTALIGN_EXTENSIONS_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fastalign"
    if sys.prefix != sys.base_prefix:  # a virtual environment: keep the build beside it
        return Path(sys.prefix) / "torch_extensions"
    return Path.home() / ".cache" / "fastalign" / "torch_extensions"


def _built(build_dir: Path, name: str) -> bool:
    return any(build_dir.glob(f"{name}*.so")) or any(build_dir.glob(f"{name}*.pyd"))


@functools.lru_cache(maxsize=1)
def load() -> ModuleType:
    """Build (first call on a machine, ~20-40 s) or load the extension; raise RuntimeError with
    the compiler's message on failure."""
    global _build_error
    # torch and its cpp_extension (setuptools, ninja) only when a build is needed
    import torch
    from torch.utils import cpp_extension  # (see above: only when a build is needed)

    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # safe: the cache key includes the CPU model
    try:
        src = _source_dir()
        digest = hashlib.sha256()
        for name in _SOURCES + _HEADERS:
            digest.update((src / name).read_bytes())
        digest.update(torch.__version__.encode())
        digest.update(_cpu_model().encode())
        name = f"fastalign_cpu_{digest.hexdigest()[:12]}"
        build_dir = _cache_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        building = not _built(build_dir, name)
        if building:  # a silent minute before the first step looks like a hang
            print(
                f"fastalign: building the C++ CPU kernels (first use with this torch / CPU / source; "
                f"about a minute), cached in {build_dir} ...",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.perf_counter()
        mod = cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=os.environ.get("FASTALIGN_VERBOSE_BUILD") == "1",
        )
        if building:
            print(
                f"fastalign: C++ CPU kernels built in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        return mod
    except Exception as exc:  # compiler missing, headers missing, ...
        _build_error = f"{type(exc).__name__}: {exc}"
        raise RuntimeError(
            "fastalign: could not build the C++ CPU kernels (a C++ compiler with OpenMP and the "
            f"`ninja` package are needed): {_build_error}"
        ) from exc


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the extension builds/loads; otherwise warn once and return False."""
    if os.environ.get("FASTALIGN_DISABLE_CPP") == "1":
        return False
    try:
        load()
        return True
    except RuntimeError as exc:
        warnings.warn(f"{exc}\nFalling back to the PyTorch backend on CPU.", RuntimeWarning, stacklevel=2)
        return False
