"""Numerics rule shared by the op tests: a fused result passes when its error against a float64
ground truth is at most 2x the error of plain PyTorch in the same dtype, plus a small atol."""

from __future__ import annotations

import os

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(
    name: str, fused: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, dtype, atol: float | None = None
) -> None:
    """fused, plain: results computed from the same `dtype` inputs; truth: from those inputs in
    float64. The scale of the atol follows the magnitude of the truth."""
    assert fused.shape == truth.shape, (name, fused.shape, truth.shape)
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    err, plain_err = max_err(fused, truth), max_err(plain, truth)
    bound = 2 * plain_err + (ATOL[dtype] if atol is None else atol) * scale
    assert err <= bound, f"{name}: error {err:.3e} > 2 x plain {dtype} error {plain_err:.3e} + atol"


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process; triton only under the interpreter."""
    names = ["torch", "cpp"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names
