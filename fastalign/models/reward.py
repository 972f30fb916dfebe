"""Scalar heads on a backbone: the sequence reward model and the per-token value model (PPO critic).

- `load_reward_model`: `AutoModelForSequenceClassification` with one label. Decoder models pool the
  last non-pad token (found from `config.pad_token_id`, hence it must be set; with right padding
  that is the last real token); encoder models (BERT-style) pool their first token.
- `ValueHeadModel`: an `AutoModel` backbone + `nn.Linear(H, 1)` giving a value per token; saved as
  the backbone folder plus `value_head.safetensors`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fastalign.models.causal_lm import (
    _pretrained_kwargs,
    enable_checkpointing,
    load_tokenizer,
    prepare_model,
    unwrap_model,
)
from fastalign.models.export import VALUE_HEAD_FILE, save_pretrained
from fastalign.models.paths import check_model_files, resolve_model_path


def _pad_token_id(folder: str, gguf_file: str | None, config, pad_token_id: int | None) -> int:
    """The kwarg, else the pad id of `load_tokenizer` (what the trainer pads with), else the config's."""
    if pad_token_id is not None:
        return int(pad_token_id)
    try:
        return int(load_tokenizer(folder, gguf_file=gguf_file).pad_token_id)
    except (OSError, ValueError, TypeError):
        if getattr(config, "pad_token_id", None) is not None:
            return int(config.pad_token_id)
    raise ValueError(
        f"reward model at {folder!r}: no tokenizer and no config.pad_token_id; pass pad_token_id= "
        "so the model can find the last real token of each sequence"
    )


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def load_reward_model(
    path: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    lora: dict | None = None,
    device: str | torch.device = "cpu",
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
):
    """A one-label sequence classifier; `rm(input_ids, attention_mask).logits[:, 0]` → (B,) rewards.

    On a causal-LM folder (e.g. stories260k) the score head is new (initialised by transformers,
    seeded by the caller's RNG); a saved reward model loads back as is. With LoRA the score head is
    trained in full (peft's SEQ_CLS task puts it in modules_to_save)."""
    from transformers import AutoModelForSequenceClassification

    folder, gguf_file = resolve_model_path(path, gguf_file)
    check_model_files(folder, gguf_file)
    kw = _pretrained_kwargs(gguf_file, dtype, attn_implementation, device, trust_remote_code)
    # transformers prints a MISSING / UNEXPECTED table for the new score head (initialised on
    # purpose) and the unused lm_head of a causal-LM folder: expected, so only anything else is told
    loader_log = logging.getLogger("transformers.modeling_utils")
    no_report = _DropLoadReport()  # a filter, not a level: transformers changes behaviour by level
    loader_log.addFilter(no_report)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, output_loading_info=True, **kw
        )
    finally:
        loader_log.removeFilter(no_report)
    head = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("score", "classifier")}
    missing = sorted(set(info.get("missing_keys", ())) - head)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith("lm_head."))
    if missing or unexpected:
        warnings.warn(
            f"reward model {path}: weights missing from the checkpoint (newly initialised): {missing}; "
            f"weights in the checkpoint the model does not use: {unexpected}",
            stacklevel=2,
        )
    model.config.pad_token_id = _pad_token_id(folder, gguf_file, model.config, pad_token_id)
    return prepare_model(
        model, gradient_checkpointing=gradient_checkpointing, lora=lora, task_type="SEQ_CLS", device=device
    )


class ValueHeadModel(nn.Module):
    """Backbone (`AutoModel`, no lm_head) + `nn.Linear(H, 1)`: values (B, T) for every token.

    The head is initialised N(0, 1/(H+1)) with zero bias, so initial values are small but the
    backbone still gets gradient on the first step (a zero head would give it none)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = unwrap_model(backbone).config.hidden_size
        if head is None:
            head = nn.Linear(hidden, 1)
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1))
            nn.init.zeros_(head.bias)
        if head.in_features != hidden or head.out_features != 1:
            raise ValueError(f"value head: expected Linear({hidden}, 1), got {head}")
        self.value_head = head

    @property
    def config(self):
        return unwrap_model(self.backbone).config

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        gguf_file: str | None = None,
        dtype: str | torch.dtype = "auto",
        attn_implementation: str = "auto",
        gradient_checkpointing: bool = False,
        lora: dict | None = None,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> ValueHeadModel:
        """Load the backbone from any model folder; the head from its value_head.safetensors when
        present (a saved ValueHeadModel), else a fresh one. The head stays trainable under LoRA."""
        from transformers import AutoModel

        folder, gguf_file = resolve_model_path(path, gguf_file)
        check_model_files(folder, gguf_file)
        kw = _pretrained_kwargs(gguf_file, dtype, attn_implementation, device, trust_remote_code)
        backbone = AutoModel.from_pretrained(folder, **kw)
        head = None
        head_file = Path(folder) / VALUE_HEAD_FILE
        if head_file.is_file():
            state = load_file(str(head_file))
            if set(state) != {"weight", "bias"} or state["weight"].shape != (1, backbone.config.hidden_size):
                raise ValueError(
                    f"{head_file}: expected tensors weight (1, {backbone.config.hidden_size}) and bias (1,), "
                    f"got { {k: tuple(v.shape) for k, v in state.items()} }"
                )
            head = nn.Linear(backbone.config.hidden_size, 1)
            head.load_state_dict(state)
        backbone = prepare_model(
            backbone,
            gradient_checkpointing=gradient_checkpointing,
            lora=lora,
            task_type="FEATURE_EXTRACTION",
            device=device,
        )
        model = cls(backbone, head)
        model.value_head.to(device=device, dtype=kw["dtype"])
        return model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids=None
    ) -> torch.Tensor:
        kwargs = {"use_cache": False} if getattr(self.config, "use_cache", None) is not None else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, T)

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint the backbone's layers (use_reentrant=False), as `gradient_checkpointing=True` does."""
        enable_checkpointing(unwrap_model(self.backbone))
        self.config.use_cache = False

    def save_pretrained(self, out_dir: str | Path, tokenizer=None, *, merge_lora: bool = True, dtype=None):
        """Backbone (config + safetensors, LoRA merged) + value_head.safetensors, written atomically."""
        return save_pretrained(self, tokenizer, out_dir, merge_lora=merge_lora, dtype=dtype)
