"""Trainable and frozen DeepSpeed engines, and model construction under ZeRO-3.

`zero_init` both enters `deepspeed.zero.Init` and registers the config with transformers
(`HfDeepSpeedConfig`): `from_pretrained` then loads each checkpoint tensor straight into its
shards (its ZeRO-3 path) instead of loading into numel-0 parameters, which would silently keep
random weights. The registration stays for the process's lifetime, as under the HF Trainer, so
every later `from_pretrained` (reference, reward model) is sharded too and `generate` syncs ranks.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from fastalign.engine.ds_config import ds_builds_optimizer, frozen_ds_config
from fastalign.models import unwrap_model

_HF_DS_CONFIG: list[Any] = []  # keeps transformers' weakly referenced HfDeepSpeedConfig alive


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _register_with_transformers(ds: dict) -> None:
    from transformers.integrations import HfDeepSpeedConfig

    _HF_DS_CONFIG[:] = [HfDeepSpeedConfig(ds)]  # sets transformers' global weak reference


def zero_init(stage: int, ds: dict):
    """Context in which models are built sharded (stage 3: `deepspeed.zero.Init`); a null context
    for stages 0–2, where every rank holds the full parameters anyway."""
    if int(stage) != 3:
        return nullcontext()
    return _zero3_init(ds)


@contextmanager
def _zero3_init(ds: dict):
    import deepspeed

    if zero_stage(ds) != 3:
        raise ValueError(f"zero_init: stage 3 requested but the config has stage {zero_stage(ds)}")
    _register_with_transformers(ds)
    # zero.Init patches tensor constructors; modules first imported inside it break (torch._dynamo's
    # polyfills check `torch.Tensor.__new__`'s signature), so import them before entering.
    import torch._dynamo  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    with deepspeed.zero.Init(config_dict_or_path=ds):
        yield


def _check_cpu_adam() -> None:
    """DeepSpeedCPUAdam is JIT-built (DS_BUILD_OPS=0); fail early with the reason, not mid-init."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as e:  # the builder raises many types (ninja / compiler / missing headers)
        raise RuntimeError(
            "offload_optimizer: cpu needs DeepSpeed's CPU Adam, which could not be built "
            f"({type(e).__name__}: {e}). Install a C++ compiler and ninja, or prebuild it with "
            "DS_BUILD_CPU_ADAM=1 pip install deepspeed, or set offload_optimizer: none"
        ) from e


def _rope_in_fp32(model: torch.nn.Module) -> None:
    """Recompute Hugging Face rotary `inv_freq` buffers that `zero.Init` built in bf16.

    zero.Init casts every floating tensor a constructor makes to the training dtype, so under bf16
    `torch.arange(..., dtype=torch.float)` in the rotary __init__ yields bf16 frequencies (0.1001
    for 0.1): positions drift and the engine's logits differ from the same weights in plain
    transformers, which keeps these fp32 (its rotary forward computes in fp32 on purpose).
    DeepSpeed's `keep_in_fp32_modules` would cast them back, but the precision is already gone.
    Here, outside zero.Init, the module's own init function recomputes them in fp32."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for m in model.modules():
        inv = getattr(m, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or inv.dtype == torch.float32 or not hasattr(m, "rope_type"):
            continue
        default = getattr(m, "compute_default_rope_parameters", None)
        fn = default if m.rope_type == "default" and default else ROPE_INIT_FUNCTIONS[m.rope_type]
        fresh, _ = fn(m.config)  # (head_dim / 2,) fp32
        m.inv_freq = fresh.to(inv.device)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq = fresh.clone().to(inv.device)


@contextmanager
def _buffers_kept(model: torch.nn.Module):
    """Put the module's buffers back as they were after `deepspeed.initialize`.

    A bf16 engine casts the whole module, buffers included (`module.bfloat16()`): RoPE's fp32
    `inv_freq` becomes bf16 (0.1001 for 0.1), positions drift, and the engine's logits differ from
    the same weights in plain transformers, which keeps such buffers fp32 (its rotary forward
    computes in fp32 on purpose). The cast makes new tensors, so the old ones are intact."""
    before = dict(model.named_buffers())
    yield
    for name, buf in list(model.named_buffers()):
        old = before.get(name)
        if old is not None and old is not buf and old.dtype != buf.dtype:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = old.to(buf.device)


def build_trainable(model: torch.nn.Module, ds: dict, optimizer=None, lr_scheduler=None):
    """`deepspeed.initialize` for a policy / value model -> (engine, optimizer, lr_scheduler).

    `optimizer` is the torch optimizer fastalign built over `model`'s trainable parameters (ZeRO
    wraps it and keeps its state sharded). When the config has an "optimizer" section
    (offload_optimizer: cpu) DeepSpeed builds its CPU Adam itself: a torch optimizer given then
    only lends its parameter groups (each group's weight_decay, e.g. none on norms and biases),
    so the offloaded run does the same AdamW maths; with None every trainable parameter is one
    group with the config's weight_decay. `lr_scheduler` (a torch scheduler, or a callable
    optimizer -> scheduler) is stepped by `engine.step()` and saved in checkpoints; a LambdaLR
    over the lending optimizer is rebuilt over DeepSpeed's. The engine is in train mode."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_trainable: the model has no trainable parameters")
    model_parameters = None
    if ds_builds_optimizer(ds):
        _check_cpu_adam()
        model_parameters = params if optimizer is None else _groups_of(optimizer)
        lr_scheduler = _rebind_scheduler(lr_scheduler, optimizer)
        optimizer = None
    elif optimizer is None:
        raise ValueError("build_trainable: pass a torch optimizer (the deepspeed config has no 'optimizer')")
    _rope_in_fp32(model)
    with _buffers_kept(model):
        engine, opt, _, sched = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model_parameters,
            lr_scheduler=lr_scheduler,
            config=ds,
        )
    engine.train()
    return engine, opt, sched


def _groups_of(optimizer) -> list[dict]:
    """The torch optimizer's parameter groups as DeepSpeed `model_parameters` (params and weight
    decay; lr, betas and eps come from the config's "optimizer" section, filled from the recipe)."""
    groups = [
        {"params": list(g["params"]), "weight_decay": g["weight_decay"]} for g in optimizer.param_groups
    ]
    return [g for g in groups if g["params"]]


def _rebind_scheduler(lr_scheduler, optimizer):
    """A scheduler for DeepSpeed's own optimizer: callables pass through; a LambdaLR built over the
    torch optimizer that only lent its groups becomes `optimizer -> LambdaLR(optimizer, same lambda)`."""
    if lr_scheduler is None or callable(lr_scheduler):
        return lr_scheduler
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR) and lr_scheduler.optimizer is optimizer:
        lams = lr_scheduler.lr_lambdas  # one per torch group; the usual single lambda is repeated
        lam = lams[0] if len({id(f) for f in lams}) == 1 else lams
        return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam)
    raise ValueError(
        "build_trainable: with offload_optimizer: cpu DeepSpeed builds the optimizer, so pass the "
        f"scheduler as a callable optimizer -> scheduler (or a LambdaLR), not a {type(lr_scheduler).__name__}"
    )


def build_frozen(model: torch.nn.Module, ds: dict):
    """A frozen model (reference / reward) as a ZeRO-3 engine with no optimizer: parameters stay
    sharded, gathered module by module in each forward. Eval mode, requires_grad off; call it
    under `torch.no_grad()`. `ds` is the trainable config; see `frozen_ds_config`."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    _rope_in_fp32(model)
    with _buffers_kept(model):
        engine, *_ = deepspeed.initialize(model=model, config=frozen_ds_config(ds))
    engine.eval()
    return engine


@contextmanager
def _head_skipped(base):
    """Temporarily swap the lm_head for Identity so the causal-LM forward returns hidden states."""
    head = base.get_output_embeddings()
    names = [n for n, m in base.named_children() if m is head]
    if head is None or not names:
        raise ValueError(f"hidden_states: cannot find the lm_head module of {type(base).__name__}")
    for n in names:
        setattr(base, n, torch.nn.Identity())
    try:
        yield
    finally:
        for n in names:
            setattr(base, n, head)


def hidden_states(
    engine_or_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, H) last hidden states (after the final norm) through the *root* forward of the
    engine with the lm_head skipped — no logits. Under ZeRO-3 this matters: the root forward
    resets the parameter-prefetch trace and the gradient-hook counters each step, which a direct
    call of the decoder submodule would bypass. Works on a plain model too."""

    base = unwrap_model(engine_or_model)
    with _head_skipped(base):
        out = engine_or_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    return out.logits  # (B, T, H): the lm_head was the identity
