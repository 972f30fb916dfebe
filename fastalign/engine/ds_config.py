"""DeepSpeed config from a recipe: the user's JSON (optional) with every "auto" filled in.

The recipe is the single source of truth for batch sizes, accumulation, clipping, precision and
the ZeRO stage; a user JSON may add anything else (bucket sizes, prefetch, comms) but a value that
contradicts the recipe is an error naming both values — DeepSpeed itself would either silently
override the recipe or fail later with a less helpful message. Pure Python: no torch import.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OFFLOAD_DEVICES = ("none", "cpu")
# fastalign-owned sections: the recipe builds the learning-rate schedule itself.
_REJECTED_SECTIONS = ("scheduler",)


def _load_user(user_json: str | dict | None) -> tuple[dict, str]:
    if user_json is None:
        return {}, "<generated>"
    if isinstance(user_json, dict):
        return copy.deepcopy(user_json), "<dict>"
    if not isinstance(user_json, (str, Path)):
        kind = type(user_json).__name__
        raise ValueError(f"deepspeed config: expected a path, JSON text or dict, got {kind}")
    text = str(user_json)
    if text.lstrip().startswith("{"):
        where = "<json text>"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed config: file {path} does not exist")
        where, text = str(path), path.read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed config {where}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"deepspeed config {where}: expected a JSON object, got {type(cfg).__name__}")
    return cfg, where


class _Filler:
    """Sets `dotted.key` = recipe value unless the user gave a different concrete value."""

    def __init__(self, cfg: dict, where: str) -> None:
        self.cfg, self.where = cfg, where

    def section(self, dotted: str) -> dict:
        node = self.cfg
        for part in dotted.split("."):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"deepspeed config {self.where}: '{dotted}' must be an object, got {child!r}"
                )
            node = child
        return node

    def fill(self, dotted: str, value: Any, *, recipe_name: str) -> None:
        head, _, key = dotted.rpartition(".")
        node = self.section(head) if head else self.cfg
        user = node.get(key, "auto")
        if user == "auto" or user is None:
            node[key] = value
            return
        if not _same(user, value):
            raise ValueError(
                f"deepspeed config {self.where}: '{dotted}' is {user!r} but the recipe's {recipe_name} "
                f'gives {value!r}; set it to "auto" (or remove it) or change the recipe'
            )
        node[key] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _check_choice(name: str, value: str) -> str:
    if value not in OFFLOAD_DEVICES:
        raise ValueError(f"{name}: expected one of {OFFLOAD_DEVICES}, got {value!r}")
    return value


def build_ds_config(
    user_json: str | dict | None,
    *,
    stage: int,
    batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
    bf16: bool,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    lr: float,
    weight_decay: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    world: int,
    hidden_size: int | None = None,
) -> dict:
    """A complete DeepSpeed config dict for `deepspeed.initialize` / `zero.Init`.

    Filled from the recipe (user "auto" or absent → recipe value; a different concrete value →
    ValueError): train_micro_batch_size_per_gpu = batch_size, gradient_accumulation_steps,
    train_batch_size = batch_size · grad_accum · world, gradient_clipping (0 = off),
    bf16.enabled, zero_optimization.stage and its offload_optimizer / offload_param devices.

    No "optimizer" section is generated: fastalign builds torch AdamW and hands it to
    `deepspeed.initialize` — except with `offload_optimizer="cpu"`, where the ZeRO-Offload step
    needs DeepSpeed's own CPU Adam (an "optimizer" section AdamW with the recipe's lr, betas,
    eps, weight_decay is added; `build_trainable` then takes only the torch optimizer's parameter
    groups, or None). A user "scheduler" section is rejected: the recipe owns the schedule.
    `hidden_size` fills the Hugging Face style "auto" bucket sizes of ZeRO-3 (h², 0.9·h²,
    persistence 10·h); without it such keys fall back to DeepSpeed's defaults.
    """
    cfg, where = _load_user(user_json)
    if int(stage) not in (0, 1, 2, 3):
        raise ValueError(f"zero stage: expected 0, 1, 2 or 3, got {stage!r}")
    for name, v in (("batch_size", batch_size), ("grad_accum", grad_accum), ("world", world)):
        if int(v) < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    _check_choice("offload_optimizer", offload_optimizer)
    _check_choice("offload_param", offload_param)
    if offload_param != "none" and int(stage) != 3:
        raise ValueError(f"offload_param={offload_param!r} needs ZeRO stage 3, got stage {stage}")
    if offload_optimizer != "none" and int(stage) == 0:
        raise ValueError(f"offload_optimizer={offload_optimizer!r} needs ZeRO stage 1, 2 or 3, got stage 0")
    for section in _REJECTED_SECTIONS:
        if section in cfg:
            raise ValueError(
                f"deepspeed config {where}: remove the '{section}' section; fastalign builds the "
                "learning-rate schedule from the recipe (train.lr, train.warmup_ratio, ...)"
            )

    f = _Filler(cfg, where)
    f.fill("train_micro_batch_size_per_gpu", int(batch_size), recipe_name="train.batch_size")
    f.fill("gradient_accumulation_steps", int(grad_accum), recipe_name="train.grad_accum")
    f.fill(
        "train_batch_size",
        int(batch_size) * int(grad_accum) * int(world),
        recipe_name="batch_size × grad_accum × world size",
    )
    f.fill("gradient_clipping", float(max_grad_norm or 0.0), recipe_name="train.max_grad_norm")
    f.fill("bf16.enabled", bool(bf16), recipe_name="bf16 mixed precision")
    fp16 = cfg.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise ValueError(
            f"deepspeed config {where}: 'fp16.enabled' is {fp16.get('enabled')!r}; fastalign trains in "
            "fp32 or bf16 (recipe train.mixed_precision), not fp16 loss scaling"
        )
    if isinstance(fp16, dict) and "enabled" in fp16:
        fp16["enabled"] = False
    f.fill("zero_optimization.stage", int(stage), recipe_name="zero stage")
    zero = f.section("zero_optimization")
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        user = zero.get(key)
        if device == "none":
            if isinstance(user, dict) and user.get("device", "none") not in ("none", "auto"):
                raise ValueError(
                    f"deepspeed config {where}: 'zero_optimization.{key}.device' is {user['device']!r} "
                    f"but the recipe's {key} is 'none'"
                )
            zero.pop(key, None)
        else:
            f.fill(f"zero_optimization.{key}.device", device, recipe_name=key)
            f.section(f"zero_optimization.{key}").setdefault("pin_memory", False)
    _fill_buckets(zero, hidden_size)

    if offload_optimizer != "none":
        opt = f.section("optimizer")
        if opt.get("type", "auto") not in ("auto", "Adam", "AdamW"):
            raise ValueError(
                f"deepspeed config {where}: 'optimizer.type' is {opt['type']!r}; the recipe trains with AdamW"
            )
        opt["type"] = "AdamW" if opt.get("type", "auto") == "auto" else opt["type"]
        f.fill("optimizer.params.lr", float(lr), recipe_name="train.lr")
        f.fill("optimizer.params.weight_decay", float(weight_decay), recipe_name="train.weight_decay")
        f.fill("optimizer.params.betas", [float(b) for b in betas], recipe_name="train.betas")
        f.fill("optimizer.params.eps", float(eps), recipe_name="adam eps")
        if opt["type"] == "Adam":
            opt["params"]["adam_w_mode"] = True
    elif "optimizer" in cfg:
        raise ValueError(
            f"deepspeed config {where}: remove the 'optimizer' section; fastalign builds torch AdamW from "
            "the recipe (DeepSpeed's optimizer is only used with offload_optimizer: cpu)"
        )
    cfg.setdefault("steps_per_print", 10**9)  # fastalign logs itself
    cfg.setdefault("wall_clock_breakdown", False)
    _reject_leftover_auto(cfg, where)
    return cfg


def _fill_buckets(zero: dict, hidden_size: int | None) -> None:
    h = int(hidden_size) if hidden_size else None
    rules = {
        "reduce_bucket_size": (lambda: h * h),
        "stage3_prefetch_bucket_size": (lambda: int(0.9 * h * h)),
        "stage3_param_persistence_threshold": (lambda: 10 * h),
    }
    for key, rule in rules.items():
        if zero.get(key) == "auto":
            if h is None:
                del zero[key]  # DeepSpeed's default
            else:
                zero[key] = rule()


def _reject_leftover_auto(node: Any, where: str, path: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_leftover_auto(v, where, f"{path}.{k}" if path else k)
    elif node == "auto":
        raise ValueError(
            f"deepspeed config {where}: '{path}' is \"auto\" but fastalign has no recipe value for it"
        )


def ds_builds_optimizer(ds: dict) -> bool:
    """True when the config has an "optimizer" section (offload_optimizer: cpu): DeepSpeed then
    builds the optimizer itself and `build_trainable` must not get one."""
    return "optimizer" in ds


def frozen_ds_config(ds: dict) -> dict:
    """The config of a frozen model (reference / reward): ZeRO-3 parameter sharding, no optimizer,
    no gradients; parameter offload kept, optimizer offload, clipping and accumulation dropped."""
    cfg = copy.deepcopy(ds)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    cfg["gradient_clipping"] = 0.0
    return cfg
