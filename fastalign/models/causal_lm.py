"""Load causal LMs and tokenizers, and give the fused loss path what it needs from them.

The fused losses (`fastalign.losses.FusedLinear*`) take the final hidden states and the lm_head
weight instead of logits, so the B×T×V logits never exist. `decoder_hidden_states` runs the decoder
stack only (final norm included, no lm_head) and `lm_head_weight` returns the (V, H) matrix the
model would multiply by — for tied embeddings, untied heads and peft-wrapped models alike.

Loading is local-only (`resolve_model_path`), safetensors-only, and never runs remote code unless
asked: a model folder is data, not a program.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from fastalign.files import describe_missing
from fastalign.models.paths import check_config_json, check_model_files, resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OUTER_WRAPPERS = ("DistributedDataParallel", "DeepSpeedEngine")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "bias")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """ "auto" → bfloat16 when the target device is CUDA and supports it, else float32 (CPU bf16
    matmuls are slow and fp16 training needs loss scaling)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: expected one of {[*DTYPES, 'auto']}, got {dtype}")
        return dtype
    if dtype == "auto":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {['auto', *DTYPES]}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_attn_implementation(
    attn_implementation: str = "auto", device: str | torch.device | None = None
) -> str:
    """ "auto" → "flash_attention_2" on CUDA when `flash_attn` is importable, else "sdpa".

    An explicit "flash_attention_2" without flash-attn installed is an error here rather than deep
    inside transformers."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if attn_implementation == "auto":
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return "flash_attention_2" if cuda and has_flash else "sdpa"
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ValueError(f"attn_implementation: expected 'auto' or e.g. 'sdpa', got {attn_implementation!r}")
    if attn_implementation == "flash_attention_2" and not has_flash:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package "
            "(`pip install fastalign[gpu]`); use 'sdpa' or 'auto'"
        )
    return attn_implementation


# ---------------------------------------------------------------------------------------------
# padding-free batches with sdpa: per-row causal attention over rows packed into one sequence
# ---------------------------------------------------------------------------------------------
_varlen_calls = [0]  # attention calls that took the padding-free path (to catch a model that drops the kwarg)
_plain_sdpa: list[Any] = []  # transformers' own sdpa function, kept when ours is registered over it


def _sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 fastalign_seq_lens=None, **kwargs):  # fmt: skip
    """transformers' sdpa attention, and with `fastalign_seq_lens` (lengths of the rows packed into
    the single sequence of `query`, (1, heads, N, d)) causal attention inside each row only.

    Why: a right-padded (R, T) batch computes every layer on R·T positions, and for preference
    batches (prompt + chosen / rejected of different lengths) half of them or more are padding.
    Packed, the linear layers see only the real tokens; sdpa's `is_causal` per row keeps each row
    to itself without an (N, N) mask (a block-diagonal mask would send sdpa to its math kernel
    and cost N² memory and work). This is what flash_attention_2's varlen kernels do on CUDA.
    Without the keyword it is transformers' sdpa, unchanged."""
    if fastalign_seq_lens is None:
        return _plain_sdpa[0](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)  # fmt: skip
    if kwargs.get("s_aux") is not None:
        raise PaddingFreeUnsupported("padding-free attention: attention sinks (s_aux) are not supported")
    _varlen_calls[0] += 1
    # Mistral passes its window as a keyword, Qwen2 / Gemma keep it on the attention module
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    gqa = query.shape[1] != key.shape[1]
    outs, start = [], 0
    for n in fastalign_seq_lens:
        q, k, v = (t[:, :, start : start + n] for t in (query, key, value))
        mask = None
        if window is not None and n > window:  # a sliding-window layer and a row longer than its window
            i = torch.arange(n, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, heads, d), as sdpa's


def _register_varlen_sdpa() -> None:
    """Put `_sdpa_varlen` in transformers' registry under "sdpa" (transformers' documented way to
    replace an attention function), wrapping the function it replaces: the model keeps
    `attn_implementation == "sdpa"` and every ordinary call runs the same code as before."""
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping.get("sdpa")
    if current is not _sdpa_varlen:
        _plain_sdpa[:] = [current]
        AttentionInterface.register("sdpa", _sdpa_varlen)


def supports_seq_lens(model) -> bool:
    """Whether `decoder_hidden_states(model, ..., seq_lens=...)` can run a padding-free batch: the
    model attends with sdpa, ours is registered for it, and it has not been caught dropping the
    rows' boundaries (see `decoder_hidden_states`)."""
    from transformers import AttentionInterface

    base = unwrap_model(model)
    config = getattr(base, "config", None)
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and AttentionInterface._global_mapping.get("sdpa") is _sdpa_varlen
        and not getattr(base, "_fastalign_no_varlen", False)
    )


def _pretrained_kwargs(gguf_file, dtype, attn_implementation, device, trust_remote_code) -> dict[str, Any]:
    return {
        "gguf_file": gguf_file,
        "dtype": resolve_dtype(dtype, device),
        "attn_implementation": resolve_attn_implementation(attn_implementation, device),
        "trust_remote_code": bool(trust_remote_code),
        "local_files_only": True,
        "use_safetensors": True,  # never unpickle a .bin checkpoint
    }


CHAT_TEMPLATES = {
    # ChatML (Qwen, SmolLM2, OpenHermes): markers as plain text where the vocabulary lacks them
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """`model.chat_template`: a name of CHAT_TEMPLATES, a .jinja file, or the template text itself
    (rendered by transformers in its sandboxed Jinja environment, never as Python)."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"model.chat_template: no file {describe_missing(value)}")
        return path.read_text()
    raise ValueError(
        f"model.chat_template: expected one of {sorted(CHAT_TEMPLATES)}, a .jinja file or the template "
        f"text, got {value!r}"
    )


def load_tokenizer(
    path: str,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
):
    """A tokenizer with right padding (the collators and last-token pooling assume it) and a pad
    token: unk when the vocabulary has one (never trained on as a target), else eos.
    `chat_template` (see `resolve_chat_template`) replaces or supplies the tokenizer's own."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_model_path(path, gguf_file)
    check_config_json(folder)
    tok = AutoTokenizer.from_pretrained(
        folder, gguf_file=gguf_file, trust_remote_code=bool(trust_remote_code), local_files_only=True
    )
    tok.padding_side = "right"
    # fastalign cuts every row to data.max_length itself; the tokenizer's "longer than the maximum
    # ... indexing errors" warning about the untruncated text is noise, so mark it as given
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ValueError(f"tokenizer at {path!r}: no pad, unk or eos token to pad with")
    if chat_template:
        tok.chat_template = resolve_chat_template(chat_template)
    return tok


def _lora_config(lora: dict, task_type: str):
    from peft import LoraConfig

    if not isinstance(lora, dict):
        raise ValueError(f"lora: expected a dict like {{'r': 8, 'alpha': 16}}, got {type(lora).__name__}")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"lora: unknown keys {unknown}; expected some of {list(LORA_KEYS)}")
    r = int(lora["r"])
    if r < 0:
        raise ValueError(f"lora.r: expected an integer >= 0, got {lora['r']!r}")
    dropout = float(lora.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout: expected 0 <= dropout < 1, got {dropout}")
    return LoraConfig(
        r=r,
        lora_alpha=float(lora.get("alpha", 2 * r)),
        lora_dropout=dropout,
        target_modules=lora.get("target_modules") or "all-linear",
        modules_to_save=lora.get("modules_to_save"),
        bias=lora.get("bias", "none"),
        task_type=task_type,
    )


def lora_enabled(lora: dict | None) -> bool:
    return bool(lora) and lora.get("r") not in (None, 0)


def is_gguf_dequantized(model) -> bool:
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def drop_gguf_quantizer(model) -> None:
    """transformers dequantises GGUF weights into plain tensors but keeps a "gguf" quantizer on the
    model, which then refuses `save_pretrained`. The weights are ordinary: forget the quantizer."""
    if is_gguf_dequantized(model):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def enable_checkpointing(model) -> None:
    """Activation checkpointing with use_reentrant=False (correct gradients with frozen inputs, as
    under LoRA, with no input-grad hack); transformers 5 renamed the method, 4.x has the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_model(model, *, gradient_checkpointing: bool, lora: dict | None, task_type: str | None, device):
    """Shared tail of every loader: device, gradient checkpointing, then LoRA (base frozen)."""
    drop_gguf_quantizer(model)
    model.to(device)
    if gradient_checkpointing:
        enable_checkpointing(model)
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False  # the KV cache is useless and warned about when training
    if lora_enabled(lora):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora, task_type))
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def load_causal_lm(
    path: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    lora: dict | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """An `AutoModelForCausalLM` (a peft model when `lora` has r > 0), on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = resolve_model_path(path, gguf_file)
    check_model_files(folder, gguf_file)
    kw = _pretrained_kwargs(gguf_file, dtype, attn_implementation, device, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    if kw["attn_implementation"] == "sdpa":
        _register_varlen_sdpa()  # padding-free training batches (`_sdpa_varlen`)
    return prepare_model(
        model, gradient_checkpointing=gradient_checkpointing, lora=lora, task_type="CAUSAL_LM", device=device
    )


def unwrap_model(model):
    """The transformers model under peft / DDP / DeepSpeed wrappers (LoRA layers stay injected)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft PeftModel
            model = model.get_base_model()
        elif type(model).__name__ in _OUTER_WRAPPERS and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _effective_linear(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a plain / peft-wrapped linear head, LoRA delta included (differentiably)."""
    if hasattr(head, "modules_to_save") and getattr(head, "active_adapters", None):
        head = head.modules_to_save[head.active_adapters[0]]  # peft ModulesToSaveWrapper
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):  # peft lora.Linear
        base = head.get_base_layer()
        weight = base.weight
        if not getattr(head, "merged", False) and not getattr(head, "disable_adapters", False):
            for name in head.active_adapters:
                if name in head.lora_A:
                    a, b = head.lora_A[name].weight, head.lora_B[name].weight
                    weight = weight + (b @ a) * head.scaling[name]  # (V, r) @ (r, H)
        return weight, base.bias
    return head.weight, getattr(head, "bias", None)


def lm_head_weight(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's (V, H) weight and (V,) bias or None — the embedding matrix when tied.

    A LoRA on the head is folded in (W + s·B·A, exact when lora dropout is 0). Under ZeRO-3 the
    returned parameter is a shard; the engine gathers it."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"lm_head_weight: {type(base).__name__} has no output embeddings (not a causal LM)")
    return _effective_linear(head)


def decoder_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids=None,
    seq_lens: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """(B, T, H) final hidden states after the final norm, without computing the lm_head logits.

    Runs the model's decoder stack (`get_decoder()`); a 4-D `attention_mask` (B, 1, T, T) —
    boolean or additive float, e.g. block-diagonal for packed sequences with per-sequence
    `position_ids` — is passed through unchanged. LoRA layers and gradient checkpointing apply as
    in the full forward since they live inside the decoder.

    `seq_lens`: `input_ids` is (1, N), rows of these lengths packed one after another, with
    `position_ids` restarting at 0 per row and no mask; each row attends only within itself (a
    model that attends with sdpa, see `supports_seq_lens`). A model whose layers do not pass
    the keyword on to their attention is caught (no attention call saw it) and refused, rather
    than letting rows attend to each other."""
    base = unwrap_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise ValueError(f"decoder_hidden_states: cannot find the decoder stack of {type(base).__name__}")
    extra = {}
    if seq_lens is not None:
        if not supports_seq_lens(model):
            raise ValueError("decoder_hidden_states: seq_lens needs a model that attends with 'sdpa'")
        extra = {"fastalign_seq_lens": tuple(int(n) for n in seq_lens)}
        calls = _varlen_calls[0]
    try:
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
    except PaddingFreeUnsupported:
        base._fastalign_no_varlen = True  # an attention that cannot keep rows apart (sinks)
        raise
    if seq_lens is not None and _varlen_calls[0] == calls:
        base._fastalign_no_varlen = True  # callers fall back to padded batches from now on
        raise PaddingFreeUnsupported(
            f"{type(base).__name__}: its layers do not pass keyword arguments on to the attention, so a "
            "padding-free batch cannot be kept inside its rows"
        )
    return out.last_hidden_state  # (B, T, H)


class PaddingFreeUnsupported(RuntimeError):
    """`decoder_hidden_states(..., seq_lens=...)` on a model that ignored the rows' boundaries."""
