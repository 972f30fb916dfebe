"""The lm_head weight for the fused losses under ZeRO-3.

Under ZeRO-3 a parameter holds only its 1/world shard (`param.numel() == 0`) outside the forward
of the module that owns it. The fused losses take the lm_head weight as an argument and run
outside that module, and `linear_logprobs` saves the weight for its backward. So:

1. forward: `fused_head_params` gathers the head's weight / bias (`GatheredParameters`) into a
   fresh full tensor and re-shards the parameter at once. The yielded tensor is the output of a
   tiny autograd Function (`_Materialize`) whose input is the parameter, so its gradient flows
   to the parameter's AccumulateGrad — the node DeepSpeed hooks to reduce-scatter the gradient
   into the owning rank's shard.
2. saved tensors: inside the context, a `saved_tensors_hooks` pair replaces any tensor saved for
   backward that shares storage with a gathered copy by a small reference (parameter + view
   geometry); the full copy is freed when the context exits.
3. backward: the unpack hook gathers the parameter again (a second all-gather, as ZeRO-3 does
   for every module's backward) and rebuilds the saved view; it lives only while that backward
   node runs.

Tied input/output embeddings need nothing special: the head weight *is* the embedding parameter,
both uses reach the same AccumulateGrad, whose hook fires once with the summed gradient. With
ZeRO 0–2 (or no DeepSpeed) the context yields the parameters themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from fastalign.models import lm_head_weight, unwrap_model


def is_zero3_param(p) -> bool:
    return isinstance(p, torch.Tensor) and hasattr(p, "ds_id")


def gathered_params(params: Iterable, modifier_rank: int | None = None):
    """`deepspeed.zero.GatheredParameters` over the ZeRO-3 parameters among `params` (a null
    context when there are none, so callers need not know the stage). Collective: every rank."""
    ps = [p for p in params if is_zero3_param(p)]
    if not ps:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(ps, modifier_rank=modifier_rank)


def _full_copy(param: torch.Tensor) -> torch.Tensor:
    """A full, private copy of a ZeRO-3 parameter (collective); the parameter stays sharded."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.data.detach().clone()


class _Materialize(torch.autograd.Function):
    """Identity from a (sharded) parameter to its gathered copy: the gradient of the copy is the
    parameter's gradient, delivered full-shape to the AccumulateGrad that ZeRO-3 hooks."""

    @staticmethod
    def forward(ctx, param, full):
        return full.view_as(full)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SavedRef:
    __slots__ = ("dtype", "offset", "param", "size", "stride")

    def __init__(self, param, t: torch.Tensor) -> None:
        self.param, self.size, self.stride = param, tuple(t.size()), tuple(t.stride())
        self.offset, self.dtype = t.storage_offset(), t.dtype


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _head_module(model):

    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        name = type(base).__name__
        raise ValueError(f"fused_head_params: {name} has no output embeddings (not a causal LM)")
    return head


@contextmanager
def fused_head_params(model) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """`with fused_head_params(model) as (weight, bias): loss = fused_loss(hidden, weight, ...)`.

    `weight` is the full (V, H) lm_head weight (the embedding matrix when tied), `bias` the (V,)
    bias or None. Under ZeRO-3 both are gathered copies valid inside the block only (their
    storage is freed on exit), differentiable into the sharded parameters; the backward may run
    after the block (e.g. `engine.backward(loss)` later). Collective under ZeRO-3: every rank
    must enter it, in the same order. Compute the hidden states BEFORE the block: computed inside it, a tied
    input embedding gets a full-size gradient where ZeRO-3 expects its empty shard (seen in the trainers).
    Without ZeRO-3 this is `lm_head_weight(model)` (LoRA on the head folded in).
    """
    head = _head_module(model)
    if not any(is_zero3_param(p) for p in head.parameters()):
        yield lm_head_weight(model)
        return
    if hasattr(head, "lora_A") or hasattr(head, "modules_to_save"):
        raise ValueError(
            "fused_head_params: LoRA / modules_to_save on the lm_head is not supported under ZeRO-3; "
            "leave lm_head out of lora.target_modules (the base head stays frozen) or use ZeRO stage <= 2"
        )
    weight, bias = head.weight, getattr(head, "bias", None)
    out: list[torch.Tensor | None] = []
    mine: list[int] = []
    for p in (weight, bias):
        if p is None:
            out.append(None)
            continue
        full = _full_copy(p)
        ptr = _storage_ptr(full)
        _COPIES[ptr] = p
        mine.append(ptr)
        out.append(_Materialize.apply(p, full))
    outermost = not _DEPTH
    _DEPTH.append(1)
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if outermost else nullcontext()
    try:
        with hooks:
            yield out[0], out[1]
    finally:
        _DEPTH.pop()
        for ptr in mine:
            _COPIES.pop(ptr, None)
        for t in out:  # every saved use went through `_pack`: free the full copies now
            if t is not None:
                t.untyped_storage().resize_(0)


# One hook pair for all nested contexts (policy and reference heads in one loss call): PyTorch
# applies only the innermost `saved_tensors_hooks`, so nesting a second pair would hide the first.
_COPIES: dict[int | None, torch.nn.Parameter] = {}  # storage ptr of a live gathered copy -> parameter
_DEPTH: list[int] = []


def _pack(t: torch.Tensor):
    p = _COPIES.get(_storage_ptr(t)) if _COPIES and isinstance(t, torch.Tensor) else None
    return t if p is None else _SavedRef(p, t)


def _unpack(x):
    if not isinstance(x, _SavedRef):
        return x
    full = _full_copy(x.param).to(x.dtype)
    return full.as_strided(x.size, x.stride, x.offset)
