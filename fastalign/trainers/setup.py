"""What every recipe loads before training: the runtime and device, the tokenizer and the policy
(built inside the runtime's `init_models()`: sharded as it loads under ZeRO-3), frozen reference
models, the export function, and for the online recipes their prompts, reward scorer and watch.

Loading order matters under ZeRO-3 (every rank builds the same engines in the same order):
policy, reference, reward models, then the value model (PPO).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastalign.config import ModelConfig
from fastalign.data.prompts import load_prompts
from fastalign.models import load_causal_lm, load_reward_model, load_tokenizer
from fastalign.rollout.rewards import RewardScorer
from fastalign.rollout.watch import RewardHackingWatch
from fastalign.trainers.runtime import Runtime, make_runtime, say


def setup(cfg, *, reward: bool = False) -> tuple[Runtime, torch.device, Any, torch.nn.Module]:
    """(runtime, device, tokenizer, policy model) of a recipe config."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bars are noise in a log file
    rt = make_runtime(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = rt.device(cfg.train.device)
    with rt.init_models():
        tok, model = load_tokenizer_and_model(cfg.model, device, reward=reward)
    if rt.distributed and getattr(rt, "stage", 0) == 3:
        held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(
            f"[rank {rt.rank}/{rt.world}] ZeRO-3 policy: this rank holds {held}/{total} parameter "
            f"elements ({held / max(1, total):.3f})",
            file=sys.stderr,
        )
    return rt, device, tok, model


def load_tokenizer_and_model(mcfg: ModelConfig, device: torch.device, *, reward: bool = False):
    tok = load_tokenizer(
        mcfg.tokenizer or mcfg.path,
        gguf_file=mcfg.gguf_file if not mcfg.tokenizer else None,
        trust_remote_code=mcfg.trust_remote_code,
        chat_template=mcfg.chat_template,
    )
    lora = None
    if mcfg.lora.r:
        lora = {"r": mcfg.lora.r, "alpha": mcfg.lora.alpha, "dropout": mcfg.lora.dropout,
                "target_modules": list(mcfg.lora.target_modules)}  # fmt: skip
    kwargs = dict(
        gguf_file=mcfg.gguf_file,
        dtype=mcfg.dtype,
        attn_implementation=mcfg.attn_implementation,
        gradient_checkpointing=mcfg.gradient_checkpointing,
        lora=lora,
        device=str(device),
    )
    if reward:
        model = load_reward_model(mcfg.path, pad_token_id=tok.pad_token_id, **kwargs)
    else:
        model = load_causal_lm(mcfg.path, trust_remote_code=mcfg.trust_remote_code, **kwargs)
    return tok, model


def load_frozen_lm(path: str, mcfg: ModelConfig, device: torch.device, rt: Runtime | None = None):
    """A frozen copy (reference model): eval mode, no gradients (ZeRO-3: a sharded frozen engine)."""
    gguf = mcfg.gguf_file if path == mcfg.path else None
    with rt.init_models() if rt is not None else nullcontext():
        ref = load_causal_lm(
            path,
            gguf_file=gguf,
            dtype=mcfg.dtype,
            attn_implementation=mcfg.attn_implementation,
            device=str(device),
            trust_remote_code=mcfg.trust_remote_code,
        )
    ref.eval().requires_grad_(False)
    return rt.frozen(ref) if rt is not None else ref


def export_fn(model: torch.nn.Module, tokenizer, rt: Runtime) -> Callable[..., None]:
    """The final export: a plain transformers folder (collective under ZeRO; rank 0 writes)."""

    def export(out_dir: Path, dtype: str | None = None) -> None:
        rt.export(model, tokenizer, out_dir, dtype=dtype)

    return export


@dataclass
class OnlineSetup:
    """What every online recipe loads: runtime, device, tokenizer, policy, prompts, frozen reference
    (or None), reward scorer and the watch."""

    rt: Runtime
    device: torch.device
    tok: Any
    model: torch.nn.Module
    prompts: list[dict]
    ref: Any
    scorer: RewardScorer
    watch: RewardHackingWatch


def setup_online(cfg, name: str, reference: str | None, *, with_ref: bool = True) -> OnlineSetup:
    """The pieces of PPO / GRPO / online DPO, loaded in a fixed order (policy, reference, rewards)."""
    torch.manual_seed(cfg.train.seed)
    rt, device, tok, model = setup(cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not cfg.data.train:
        raise ValueError(
            "data.train: no prompt file given (JSONL / JSON / parquet / CSV with a 'prompt' column)"
        )
    prompts, report = load_prompts(
        cfg.data.train,
        tok,
        max_prompt_length=cfg.data.max_prompt_length,
        columns=dict(cfg.data.columns) or None,
        chat_template=cfg.data.chat_template,
        strict=cfg.data.strict,
        max_rows=cfg.data.max_rows,
        split=cfg.data.split,
    )
    say(f"[{name}] prompts {cfg.data.train}: {report.summary()}")
    ref = load_frozen_lm(reference or cfg.model.path, cfg.model, device, rt) if with_ref else None
    scorer = RewardScorer(cfg.reward, device=device, runtime=rt, seed=cfg.train.seed)
    say(f"[{name}] rewards: {scorer.describe()}; KL coef {cfg.kl.coef:g} ({cfg.kl.estimator})")
    return OnlineSetup(rt, device, tok, model, prompts, ref, scorer, RewardHackingWatch(cfg.watch))
