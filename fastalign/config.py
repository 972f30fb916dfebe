"""Recipe configuration: one dataclass tree per training method, filled from YAML plus dotted overrides.

    cfg = load_config(DPORecipe, "configs/dpo.yaml", ["train.lr=1e-5", "model.gguf_file=null"])

Why a hand-rolled loader rather than OmegaConf / Hydra: the rules are few and the errors matter more
than the features. Every value is type-checked against the dataclass annotation, and every error says
*which* dotted key, *where* the value came from (the YAML file or an override) and what was expected:

    train.lr: expected float, got 'abc' (str) [from override]
    Unknown key 'train.lrr' [in cfg.yaml]; did you mean 'train.lr'?

YAML is read with `yaml.safe_load` (never evaluated). Two YAML 1.1 quirks are handled on purpose:
`1e-5` (no dot) loads as a string, so a float field accepts any string that parses as a float; and
unquoted `no` / `yes` / `on` / `off` load as booleans, so an override's raw text is used for string
fields (`train.mixed_precision=no` works), while in a file the error tells you to quote it.

Overrides apply after the file, in order. An override naming a whole section
(`model.lora={r: 8}`) replaces that section: its unnamed fields take their defaults.
After loading, every dataclass's `validate()` runs (cross-field and range checks).

Kept import-light: no torch at import (the CLI imports this at startup).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from fastalign.files import describe_missing
from fastalign.rollout.config import KLConfig, RewardConfig, WatchConfig  # dataclasses only, no torch

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, msg: str) -> None:
    """Raise the validation error for `key` (relative to its section; the loader prefixes it)."""
    if not ok:
        raise ValueError(f"{key}: {msg}")


@dataclass
class LoraConfig:
    """LoRA adapters; r = 0 trains the full model."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

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
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        _require(self.attn_implementation != "", "attn_implementation", "must not be empty")


@dataclass
class DataConfig:
    """Where the examples come from and how they are cut."""

    train: str = ""
    eval: str | None = None
    eval_fraction: float = 0.0
    split: str = "train"
    format: Literal["auto", "preference", "hh", "chat", "kto", "sft"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 512
    max_prompt_length: int | None = None
    strict: bool = False
    packing: bool = False
    max_rows: int | None = None

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


@dataclass
class TrainConfig:
    """The shared loop: optimisation, schedule, precision, logging and checkpoints."""

    output_dir: str = "runs/run"
    seed: int = 0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    device: str = "auto"
    threads: int | None = None
    eval_every: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_last: int = 2
    resume: str = "auto"
    fused: bool = True
    tensorboard: bool = True
    progress: bool = True
    export: bool = True
    # dtype of the exported weights: "auto" keeps the training dtype (fp32 master weights under
    # bf16 autocast); bfloat16 / float16 halve the folder
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def validate(self) -> None:
        _require(self.output_dir != "", "output_dir", "must not be empty")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "max_steps", f"must be >= 1 (or null), got {self.max_steps}")
        _require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None:
            _require(
                self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}"
            )
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a finite number > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(
            len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
            "adam_betas",
            f"must be two numbers in [0, 1), got {self.adam_betas}",
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
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        if self.max_grad_norm is not None:
            _require(
                self.max_grad_norm > 0,
                "max_grad_norm",
                f"must be > 0 (or null: no clipping), got {self.max_grad_norm}",
            )
        _require(self.device != "", "device", "must not be empty ('auto', 'cpu', 'cuda', 'cuda:1', ...)")
        if self.threads is not None:
            _require(self.threads >= 1, "threads", f"must be >= 1 (or null), got {self.threads}")
        _require(
            self.eval_every >= 0, "eval_every", f"must be >= 0 (0: at the end only), got {self.eval_every}"
        )
        _require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        _require(
            self.save_every >= 0, "save_every", f"must be >= 0 (0: at the end only), got {self.save_every}"
        )
        _require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        _require(self.resume != "", "resume", "must not be empty ('auto', 'never' or a checkpoint path)")


@dataclass
class EngineConfig:
    """Where the steps run: one process, or DeepSpeed ZeRO on every rank of a launcher
    (`torchrun` / `deepspeed`). backend "auto" picks DeepSpeed when the launcher set WORLD_SIZE > 1.
    Under DeepSpeed `train.batch_size` is the micro-batch *per rank* (DeepSpeed's
    train_micro_batch_size_per_gpu): the global batch is batch_size x grad_accum x world size."""

    backend: Literal["auto", "none", "deepspeed"] = "auto"
    zero_stage: int = 3
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    ds_config: str | None = None  # a DeepSpeed JSON; its "auto" fields are filled from the recipe
    # per-rank budget for model states (GiB) checked before loading; None: the device's memory
    # (GPU) or the machine's available RAM divided by the local ranks (CPU)
    memory_limit_gb: float | None = None

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
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    stop: list[str] = field(default_factory=list)
    batch_size: int = 16  # prompts per generate() call
    zero_mode: Literal["auto", "gather", "synced"] = "auto"

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
class SFTConfig:
    """Supervised fine-tuning options."""

    completion_only: bool = True


@dataclass
class RMConfig:
    """Bradley-Terry reward model options."""

    use_margin: bool = False
    center_coef: float = 0.0
    # train on each row's p_chosen (AI feedback, `fastalign cai label`) as a soft Bradley-Terry target
    soft_labels: bool = False

    def validate(self) -> None:
        _require(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")


@dataclass
class DPOConfig:
    """The DPO family (DPO and its loss types, IPO, SimPO, ORPO)."""

    method: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    average_log_prob: bool | None = None
    simpo_gamma_beta_ratio: float = 0.5
    orpo_lambda: float = 0.1
    precompute_ref_logps: bool = False
    reference: str | None = None
    # each row's p_chosen (`fastalign cai label`) as per-pair label smoothing ε = 1 − p_chosen
    soft_labels: bool = False

    def validate(self) -> None:
        from fastalign.losses.preference import DPO_LOSS_TYPES  # torch: only when validating a DPO recipe

        _require(
            self.loss_type in DPO_LOSS_TYPES,
            "loss_type",
            f"expected one of {', '.join(map(repr, DPO_LOSS_TYPES))}, got {self.loss_type!r}",
        )
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(
            0.0 <= self.label_smoothing < 0.5,
            "label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        _require(
            self.simpo_gamma_beta_ratio >= 0,
            "simpo_gamma_beta_ratio",
            f"must be >= 0, got {self.simpo_gamma_beta_ratio}",
        )
        _require(self.orpo_lambda >= 0, "orpo_lambda", f"must be >= 0, got {self.orpo_lambda}")
        if self.soft_labels:
            _require(
                self.method == "dpo" and self.loss_type in ("sigmoid", "robust"),
                "soft_labels",
                f"needs method dpo with loss_type sigmoid or robust, got {self.method}/{self.loss_type}",
            )
            _require(
                self.label_smoothing == 0,
                "soft_labels",
                "the per-row p_chosen replaces label_smoothing; set label_smoothing to 0",
            )


@dataclass
class KTOConfig:
    """Kahneman-Tversky optimisation options."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref_logps: bool = False
    reference: str | None = None

    def validate(self) -> None:
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(self.desirable_weight > 0, "desirable_weight", f"must be > 0, got {self.desirable_weight}")
        _require(
            self.undesirable_weight > 0, "undesirable_weight", f"must be > 0, got {self.undesirable_weight}"
        )


@dataclass
class PromptDataConfig:
    """Prompts of the online recipes (PPO, GRPO, online DPO); see fastalign.data.prompts. A row's
    `prompt` is a string or a chat-message list; other columns go to reward functions by name."""

    train: str = ""
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)  # only {"prompt": "<source column>"}
    max_prompt_length: int = 256  # longer prompts keep their LAST tokens
    # plain-string prompts get the tokenizer's chat template (one user turn + generation prompt)
    # when it has one; message lists always do
    chat_template: bool = True
    strict: bool = False
    max_rows: int | None = None

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


def _check_updates(obj, what: str) -> None:
    _require(
        obj.epochs >= 1, "epochs", f"{what} passes over each rollout batch; must be >= 1, got {obj.epochs}"
    )
    _require(obj.minibatches >= 1, "minibatches", f"must be >= 1, got {obj.minibatches}")


@dataclass
class PPOConfig:
    """PPO (Schulman et al. 2017) as in InstructGPT: per-token reward = score − kl.coef·k1, GAE,
    `epochs` × `minibatches` clipped updates of policy and value per rollout batch."""

    epochs: int = 2
    minibatches: int = 2
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    target_kl: float | None = None  # stop the epoch loop when the policy's approx KL passes it
    # "separate": a ValueHeadModel (own optimizer / engine) from value_path, else the first reward
    # model folder, else the policy's folder; "shared": a value head on the policy's hidden states
    value_model: Literal["separate", "shared"] = "separate"
    value_path: str | None = None
    value_lr: float | None = None  # null: train.lr
    reference: str | None = None  # null: the policy's initial weights (model.path)

    def validate(self) -> None:
        _check_updates(self, "PPO epochs:")
        _require(self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps}")
        _require(self.value_clip > 0, "value_clip", f"must be > 0, got {self.value_clip}")
        _require(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")
        _require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        if self.target_kl is not None:
            _require(self.target_kl > 0, "target_kl", f"must be > 0 (or null), got {self.target_kl}")
        if self.value_lr is not None:
            _require(self.value_lr > 0, "value_lr", f"must be > 0 (or null), got {self.value_lr}")
        _require(
            self.value_model == "separate" or self.value_path is None,
            "value_path",
            "is only used with value_model: separate",
        )


GRPO_AGGS = ("auto", "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig:
    """GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025) and RLOO (Ahmadian et al. 2024):
    `group_size` samples per prompt, group advantages, no value model, KL (kl.estimator, k3 by
    default) in the loss with kl.coef."""

    estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    group_size: int = 4
    epochs: int = 1  # 1 × 1 minibatch: on-policy (ratio 1); more: PPO-style clipped reuse
    minibatches: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher
    entropy_coef: float = 0.0
    # "auto": grpo → seq-mean-token-mean, dr_grpo → seq-mean-token-sum-norm, rloo → token-mean
    agg: str = "auto"
    reference: str | None = None

    def validate(self) -> None:
        _check_updates(self, "passes")
        _require(
            self.group_size >= 2, "group_size", f"must be >= 2 (a group baseline), got {self.group_size}"
        )
        _require(self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps}")
        if self.clip_eps_high is not None:
            _require(
                self.clip_eps_high > 0, "clip_eps_high", f"must be > 0 (or null), got {self.clip_eps_high}"
            )
        _require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _require(self.agg in GRPO_AGGS, "agg", f"expected one of {', '.join(GRPO_AGGS)}, got {self.agg!r}")


@dataclass
class OnlineDPOConfig:
    """Online / iterative DPO: each iteration samples `num_samples` responses per prompt, the best
    and worst by reward become a pair (ties skipped), then DPO steps against the reference."""

    num_samples: int = 2
    beta: float = 0.1
    loss_type: str = "sigmoid"
    epochs: int = 1
    minibatches: int = 1
    ref_refresh: bool = False  # copy the policy into the reference at each iteration start
    reference: str | None = None

    def validate(self) -> None:
        from fastalign.losses.preference import DPO_LOSS_TYPES  # torch: only when validating this recipe

        _check_updates(self, "passes")
        _require(self.num_samples >= 2, "num_samples", f"must be >= 2 (a pair), got {self.num_samples}")
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(
            self.loss_type in DPO_LOSS_TYPES,
            "loss_type",
            f"expected one of {', '.join(map(repr, DPO_LOSS_TYPES))}, got {self.loss_type!r}",
        )
        _require(
            not (self.ref_refresh and self.reference is not None),
            "ref_refresh",
            "copies the policy into the reference; it cannot be combined with a separate reference",
        )


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
@dataclass
class SFTRecipe:
    method: ClassVar[str] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class RMRecipe:
    method: ClassVar[str] = "rm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class DPORecipe:
    method: ClassVar[str] = "dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class KTORecipe:
    method: ClassVar[str] = "kto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class PPORecipe:
    method: ClassVar[str] = "ppo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class GRPORecipe:
    method: ClassVar[str] = "grpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=0.04, estimator="k3"))
    watch: WatchConfig = field(default_factory=WatchConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class OnlineDPORecipe:
    method: ClassVar[str] = "online-dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)  # only the logged KL; online_dpo.beta is the strength
    watch: WatchConfig = field(default_factory=WatchConfig)
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


RECIPES: dict[str, type] = {
    "sft": SFTRecipe,
    "rm": RMRecipe,
    "dpo": DPORecipe,
    "kto": KTORecipe,
    "ppo": PPORecipe,
    "grpo": GRPORecipe,
    "online-dpo": OnlineDPORecipe,
}


# ---------------------------------------------------------------------------------------------
# type checking / coercion
# ---------------------------------------------------------------------------------------------
_NO_TEXT = object()  # "no raw override text available" (values from a YAML file)


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (annotations are strings here)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not fit a type; the loader turns it into the user-facing message."""

    def __init__(self, key: str, expected: Any, value: Any, hint: str = "") -> None:
        super().__init__(key)
        self.key, self.expected, self.value, self.hint = key, expected, value, hint


def _yaml_bool_hint(value: Any, text: Any) -> str:
    if isinstance(value, bool) and text is _NO_TEXT:
        return " (YAML reads unquoted no/yes/on/off/true/false as booleans: quote the value, e.g. 'no')"
    return ""


def _coerce(value: Any, tp: Any, key: str, text: Any = _NO_TEXT, where: str = "") -> Any:
    """Check `value` against annotation `tp` and return it in that type; raise _Mismatch (or
    ValueError for unknown keys inside a section). `text` is the raw override string, used for
    string-typed fields where YAML turned `no` / `123` into a bool / number."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, text, where)
            except _Mismatch as exc:
                errors.append(exc)
        raise _Mismatch(key, tp, value, next((e.hint for e in errors if e.hint), ""))
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        if isinstance(text, str) and text.strip() in choices:
            return text.strip()
        raise _Mismatch(key, tp, value, _yaml_bool_hint(value, text))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML 1.1 leaves "1e-5" as a string
            except ValueError:
                pass
        raise _Mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(text, str) and value is not None and not isinstance(value, (list, dict)):
            return text.strip()  # override `x=no` / `x=123` meant the string
        raise _Mismatch(key, tp, value, _yaml_bool_hint(value, text))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Mismatch(key, tp, value)
        return [_coerce(v, item_tp, f"{key}[{i}]", where=where) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise _Mismatch(key, tp, value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Mismatch(f"{key}.{k}", key_tp, k, " (keys must be strings)")
            out[k] = _coerce(v, val_tp, f"{key}.{k}", where=where)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch(key, tp, value)
        return _build(tp, value, key, where)
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r} in the config schema")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of a dataclass tree (sections and leaves)."""
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


class _Unknown(Exception):
    """Internal: a key the schema does not have; the loader adds the source and a suggestion."""

    def __init__(self, key: str, where: str) -> None:
        super().__init__(key)
        self.key, self.where = key, where


def _unknown_key(key: str, where: str, root: type) -> ValueError:
    """Suggest the closest valid key: a sibling with a similar name ("train.lrr" -> "train.lr"),
    else any key with a similar full path ("trian.lr" -> "train.lr"); else list the siblings."""
    candidates = _all_keys(root)
    parent, _, tail = key.rpartition(".")
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    by_tail = {c.rpartition(".")[2]: c for c in siblings}
    close = [by_tail[t] for t in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)]
    if not close:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    if close:
        return ValueError(f"Unknown key {key!r} [{where}]; did you mean {close[0]!r}?")
    listing = f" Valid keys here: {', '.join(siblings)}." if siblings else ""
    return ValueError(f"Unknown key {key!r} [{where}].{listing}")


def _build(cls: type, raw: Mapping, prefix: str, where: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _Unknown(key, where)
        kwargs[name] = _coerce(value, hints[name], key, where=where)
    return cls(**kwargs)


def _mismatch_error(exc: _Mismatch, where: str) -> ValueError:
    v = exc.value
    shown = repr(v) if not isinstance(v, (dict, list)) or len(repr(v)) <= 60 else repr(v)[:57] + "..."
    expected = _type_name(exc.expected)
    return ValueError(f"{exc.key}: expected {expected}, got {shown} ({type(v).__name__}) [{where}]{exc.hint}")


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------
def _parse_override(item: str) -> tuple[str, Any, str]:
    import yaml

    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"Override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-5")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(
            f"Override {item!r}: empty key (or empty part in a dotted key); expected e.g. train.lr=1e-5"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"Override {item!r}: the value is not valid YAML ({exc})") from None
    return key, value, text


def _apply_override(cfg: Any, key: str, value: Any, text: str, item: str) -> None:
    where = "from override"
    parts = key.split(".")
    obj, done = cfg, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join([*done, part])
        if dataclasses.is_dataclass(obj):
            hints = _hints(type(obj))
            if part not in hints:
                raise _Unknown(path if last else key, where)
            if last:
                setattr(obj, part, _coerce(value, hints[part], path, text, where))
                return
            child_tp, child = hints[part], getattr(obj, part)
            if typing.get_origin(child_tp) is dict:
                # dict field: the rest of the key (may contain dots) names one entry
                entry = ".".join(parts[i + 1 :])
                _, val_tp = typing.get_args(child_tp)
                child[entry] = _coerce(value, val_tp, key, text, where)
                return
            if not dataclasses.is_dataclass(child):
                raise ValueError(
                    f"Override {item!r}: {path} is a value ({_type_name(child_tp)}), not a section; "
                    f"it has no key {parts[i + 1]!r}"
                )
            obj = child
        done.append(part)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _validate_tree(obj: Any, prefix: str, where: str) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child, f"{prefix}{f.name}.", where)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as exc:
            raise ValueError(f"{prefix}{exc} [{where}]") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build recipe `cls` from the YAML mapping at `path` (optional) and dotted `overrides`
    ("train.lr=1e-5", "data.columns.prompt=question", "model.lora.target_modules=[q_proj,v_proj]",
    "model.gguf_file=null"), then run every section's validate(). Raises FileNotFoundError for a
    missing file, ValueError (naming key, source and expectation) for anything else wrong."""
    import yaml

    if isinstance(overrides, str):
        overrides = [overrides]
    raw: Any = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = f"in {path}"
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {describe_missing(path)}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"{path}: expected a YAML mapping of sections (model:, data:, train:, ...) at the top level, "
                f"got {type(raw).__name__}"
            )
    recipe_method = getattr(cls, "method", None)
    raw = dict(raw)
    if "method" in raw and "method" not in _hints(cls):
        method = raw.pop("method")
        if method != recipe_method:
            raise ValueError(
                f"method: this config is for {method!r} but is being loaded as the {recipe_method!r} recipe "
                f"[{where}]"
            )
    try:
        cfg = _build(cls, raw, "", where)
    except _Mismatch as exc:
        raise _mismatch_error(exc, where) from None
    except _Unknown as exc:
        raise _unknown_key(exc.key, exc.where, cls) from None
    parsed = [_parse_override(item) for item in overrides]
    for item, (key, value, text) in zip(overrides, parsed, strict=True):
        if key == "method" and "method" not in _hints(cls):
            if value != recipe_method:
                raise ValueError(f"Override {item!r}: the recipe is {recipe_method!r}, not {value!r}")
            continue
        try:
            _apply_override(cfg, key, value, text, item)
        except _Mismatch as exc:
            raise _mismatch_error(exc, "from override") from None
        except _Unknown as exc:
            raise _unknown_key(exc.key, exc.where, cls) from None
    if overrides:
        where = f"{where} + overrides" if path is not None else "from overrides"
    _validate_tree(cfg, "", where)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON-ready); a recipe's `method` comes first."""
    out: dict = {}
    method = getattr(type(cfg), "method", None)
    if isinstance(method, str) and "method" not in _hints(type(cfg)):
        out["method"] = method
    out.update(dataclasses.asdict(cfg))
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write `cfg` as YAML; `load_config(type(cfg), path)` gives an equal config back."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
