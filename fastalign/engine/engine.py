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


def build_trainable(model: torch.nn.Module, ds: dict, optimizer=None, lr_scheduler=None):
    """`deepspeed.initialize` for a policy / value model -> (engine, optimizer, lr_scheduler).

    `optimizer` is the torch optimizer fastalign built over `model`'s trainable parameters (ZeRO
    wraps it and keeps its state sharded), or None when the config has an "optimizer" section
    (offload_optimizer: cpu: DeepSpeedCPUAdam). `lr_scheduler` (a torch scheduler over that
    optimizer, or a callable optimizer -> scheduler) is stepped by `engine.step()` and saved in
    checkpoints. The engine is in train mode."""
    import deepspeed

    from fastalign.engine.ds_config import ds_builds_optimizer

    if ds_builds_optimizer(ds):
        if optimizer is not None:
            raise ValueError(
                "build_trainable: the deepspeed config has an 'optimizer' section (offload_optimizer: "
                "cpu), so DeepSpeed builds the optimizer; pass optimizer=None"
            )
        _check_cpu_adam()
    elif optimizer is None:
        raise ValueError("build_trainable: pass a torch optimizer (the deepspeed config has no 'optimizer')")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_trainable: the model has no trainable parameters")
    engine, opt, _, sched = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params if optimizer is None else None,
        lr_scheduler=lr_scheduler,
        config=ds,
    )
    engine.train()
    return engine, opt, sched


def build_frozen(model: torch.nn.Module, ds: dict):
    """A frozen model (reference / reward) as a ZeRO-3 engine with no optimizer: parameters stay
    sharded, gathered module by module in each forward. Eval mode, requires_grad off; call it
    under `torch.no_grad()`. `ds` is the trainable config; see `frozen_ds_config`."""
    import deepspeed

    from fastalign.engine.ds_config import frozen_ds_config

    model.requires_grad_(False)
    model.eval()
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
    from fastalign.models import unwrap_model

    base = unwrap_model(engine_or_model)
    with _head_skipped(base):
        out = engine_or_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    return out.logits  # (B, T, H): the lm_head was the identity
