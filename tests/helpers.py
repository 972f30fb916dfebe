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


F32_EPS = torch.finfo(torch.float32).eps


def _rms_norm_in_float64(self, x: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm.forward, no cast
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_truth(model):
    """A float64 deep copy of `model`: the ground truth for the same weights. `.double()` alone is
    not one for Llama: transformers' LlamaRMSNorm casts its input to float32, so every norm rounds
    the float64 hidden states to float32 (logits of stories260k move by ~3e-6, a quarter of the
    float32 model's own error). In the copy the norms compute in float64."""
    import copy
    import types

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    truth = copy.deepcopy(model).double()
    for module in truth.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_norm_in_float64, module)
        elif type(module).__name__.endswith("RMSNorm"):
            raise TypeError(f"float64_truth: {type(module).__name__} may round to float32")
    return truth


def assert_same_float32_function(name: str, other, plain, truth, ulps: float = 2) -> None:
    """Two float32 computations of one function (an export and the live model, a padded batch and a
    row alone): `other`'s error against the float64 `truth` is at most twice `plain`'s plus `ulps`
    float32 ulps of the truth's scale. A fixed atol between the two float32 results holds only
    where the CPU's kernels happen to round the two ways alike."""
    assert_within_rule(name, other, plain, truth, torch.float32, atol=ulps * F32_EPS)


def assert_within_float32_error(name: str, other, truth, plain_err: float, ulps: float = 2) -> None:
    """`other`, a float32 result, against its float64 `truth`: error at most twice `plain_err` plus
    `ulps` float32 ulps of the truth's scale. `plain_err`: the error of the plain float32 computation
    of the same quantity on the same inputs, measured over more values than `other` has (say every
    candidate token, not only the sampled one): the maximum of a few dozen float32 errors is a noisy
    sample, which two equally valid computations miss by up to ~3x."""
    assert other.shape == truth.shape, (name, other.shape, truth.shape)
    assert torch.isfinite(other).all(), f"{name}: non-finite values"
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    err = max_err(other, truth)
    bound = 2 * plain_err + ulps * F32_EPS * scale
    assert err <= bound, f"{name}: error {err:.3e} > 2 x plain float32 error {plain_err:.3e} + {ulps} ulps"
