"""Backend resolution shared by the fused ops.

Backends: "triton" (CUDA tensors; CPU tensors too when TRITON_INTERPRET=1, for tests),
"cpp" (CPU tensors; JIT-built C++/OpenMP kernels), "torch" (pure PyTorch, runs anywhere),
"auto" (best available for the tensor's device).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fastalign.ops import _cpp

BACKENDS = ("auto", "triton", "cpp", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend_name(backend: str, op: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return the concrete backend for `device`; raise a clear error if it cannot run there."""
    check_backend_name(backend, op)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        if device.type == "cpu":
            return "cpp" if _cpp.available() else "torch"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the `triton` package; pip install triton")
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
            )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' needs CPU tensors (got {device.type})")

        _cpp.load()  # raises with the compiler's message if the build fails
    return backend


def require_tensor(x: object, name: str, op: str) -> None:
    """A clear TypeError for a non-tensor argument (a Python list of labels, say), instead of an
    AttributeError from deep inside the op."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}"
            + (" (wrap it: torch.tensor(...))" if isinstance(x, (list, tuple)) else "")
        )


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int, op: str) -> None:
    """Labels outside [0, V) other than ignore_index are a ValueError, never a kernel crash."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        value = int(labels[tuple(idx)])
        raise ValueError(
            f"{op}: {int(bad.sum())} label(s) outside [0, {vocab_size}) and not ignore_index="
            f"{ignore_index}; first at position {tuple(idx)} with value {value}"
        )


def check_temperature(temperature: float, op: str) -> float:
    t = float(temperature)
    if not (t > 0.0 and t != float("inf")):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    return t


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token results are fp32 (fp64 for fp64 inputs, so gradcheck works)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
