"""Each method's own section: SFT, reward model, the DPO family, KTO, PPO, GRPO, online DPO, and
the online recipes' reward / KL / reward-hacking-watch sections. Torch-free (the DPO loss types
are imported from fastalign.losses only when a DPO section is validated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fastalign.config.checks import finite as _finite
from fastalign.config.checks import require as _require


@dataclass
class SFTConfig:
    """Supervised fine-tuning options."""

    completion_only: bool = True
    """learn the completion tokens only (false: every token but the first)"""


@dataclass
class RMConfig:
    """Bradley-Terry reward model options."""

    use_margin: bool = False
    """subtract a per-pair margin column from the reward difference (Llama 2)"""
    center_coef: float = 0.0
    """penalty on the mean squared reward, keeping rewards centred"""
    soft_labels: bool = False
    """train on each row's p_chosen (AI feedback) as a soft Bradley-Terry target"""

    def validate(self) -> None:
        _require(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")


@dataclass
class DPOConfig:
    """The DPO family (DPO and its loss types, IPO, SimPO, ORPO)."""

    method: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    """'dpo' (any loss_type), 'ipo' (IPO on per-token log-ratios, as TRL >= 1), 'simpo' or 'orpo'
    (no reference); loss_type ipo under method dpo is the same loss (ipo_sum: the summed TRL 0.x form)"""
    loss_type: str = "sigmoid"
    """the DPO loss variant (method dpo; TRL >= 1 definitions; cdpo, ipo_sum, bco_pair_shift are TRL
    0.x's sigmoid with label smoothing, ipo on sums, bco_pair with its shift); --help lists them"""
    beta: float = 0.1
    """strength of the preference (inverse temperature of the implicit reward)"""
    label_smoothing: float = 0.0
    """assumed fraction of flipped labels (cdpo / robust; sigmoid with it is cdpo)"""
    average_log_prob: bool | None = None
    """average log-probs over tokens (null: the method's default)"""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO target margin gamma / beta"""
    orpo_lambda: float = 0.1
    """weight of ORPO's odds-ratio term"""
    precompute_ref_logps: bool = False
    """score the data with the reference once, cache it, free the reference"""
    reference: str | None = None
    """reference model (null: the policy's initial weights, model.path)"""
    soft_labels: bool = False
    """each row's p_chosen (fastalign cai label) as per-pair label smoothing 1 - p_chosen"""

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
                self.method == "dpo" and self.loss_type in ("sigmoid", "cdpo", "robust"),
                "soft_labels",
                f"needs method dpo, loss_type sigmoid, cdpo or robust; got {self.method}/{self.loss_type}",
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
    """strength of the KL-anchored value function"""
    desirable_weight: float = 1.0
    """weight of desirable examples"""
    undesirable_weight: float = 1.0
    """weight of undesirable examples"""
    precompute_ref_logps: bool = False
    """score the data with the reference once, cache it, free the reference"""
    reference: str | None = None
    """reference model (null: the policy's initial weights)"""

    def validate(self) -> None:
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(self.desirable_weight > 0, "desirable_weight", f"must be > 0, got {self.desirable_weight}")
        _require(
            self.undesirable_weight > 0, "undesirable_weight", f"must be > 0, got {self.undesirable_weight}"
        )


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
    """passes over each rollout batch"""
    minibatches: int = 2
    """optimizer steps per pass"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    value_clip: float = 0.2
    """value-prediction clip around the rollout values"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    entropy_coef: float = 0.0
    """entropy bonus"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_advantages: bool = True
    """normalise advantages over the global batch"""
    target_kl: float | None = None
    """stop a rollout's epochs when the approx KL passes it (null: never)"""
    value_model: Literal["separate", "shared"] = "separate"
    """'separate' critic (own optimizer) or a 'shared' head on the policy"""
    value_path: str | None = None
    """the critic's backbone (null: the first reward model, else the policy's folder)"""
    value_lr: float | None = None
    """critic lr (null: train.lr)"""
    reference: str | None = None
    """reference model (null: the policy's initial weights)"""

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
    """advantages: grpo (mean/std), dr_grpo (mean only), rloo (leave-one-out)"""
    group_size: int = 4
    """responses sampled per prompt"""
    epochs: int = 1
    """passes over each rollout batch (1 x 1 minibatch: on-policy)"""
    minibatches: int = 1
    """optimizer steps per pass"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    clip_eps_high: float | None = None
    """upper clip (DAPO clip-higher; null: clip_eps)"""
    entropy_coef: float = 0.0
    """entropy bonus"""
    agg: str = "auto"
    """loss aggregation ('auto': the estimator's own)"""
    reference: str | None = None
    """reference model (null: the policy's initial weights)"""

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
    """responses sampled per prompt; best vs worst become a pair"""
    beta: float = 0.1
    """DPO beta"""
    loss_type: str = "sigmoid"
    """DPO loss type (as dpo.loss_type)"""
    epochs: int = 1
    """passes over each iteration's pairs"""
    minibatches: int = 1
    """optimizer steps per pass"""
    ref_refresh: bool = False
    """copy the policy into the reference at each iteration (iterative DPO)"""
    reference: str | None = None
    """reference model (null: the policy's initial weights)"""

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


@dataclass
class RewardConfig:
    """Where rewards come from and how they are shaped.

    total = model_weight · RM + function_weight · fn − length_penalty · tokens − missing_eos_penalty
    (each term only when configured); then optionally normalised by running mean / std and clipped.
    Several reward models form an ensemble aggregated by `ensemble` ("min" is the conservative choice
    against reward hacking: the policy must please every model). Each model scores with its own
    tokenizer (responses are decoded text, re-encoded), in the format of fastalign's RM recipe, or with
    its chat template (`template`)."""

    models: list[str] = field(default_factory=list)
    """reward model folders (several: an ensemble)"""
    ensemble: Literal["min", "mean"] = "min"
    """how several reward models combine ('min' is the conservative choice)"""
    function: str | None = None
    """a reward function: 'package.module:function' or 'path/to/file.py:function'"""
    function_kwargs: dict[str, Any] = field(default_factory=dict)
    """keyword arguments for the reward function"""
    model_weight: float = 1.0
    """weight of the reward models' score"""
    function_weight: float = 1.0
    """weight of the function's reward"""
    normalize: bool = False
    """normalise rewards by a running mean / std"""
    clip: float | None = None
    """clip rewards to [-clip, clip] (null: off)"""
    length_penalty: float = 0.0
    """subtracted per response token"""
    missing_eos_penalty: float | None = None
    """subtracted when a response does not end (null: off)"""
    batch_size: int = 16
    """responses per reward-model forward"""
    max_length: int = 512
    """tokens per scored prompt + response"""
    template: Literal["auto", "chat", "plain"] = "auto"
    """how reward models see the text: 'chat' template, 'plain', or 'auto'"""

    def validate(self) -> None:
        _require(
            bool(self.models) or self.function is not None,
            "models",
            "no reward source: give reward.models (reward model folders) and/or "
            "reward.function ('package.module:function' or 'path/to/file.py:function')",
        )
        _require(
            all(isinstance(m, str) and m.strip() for m in self.models), "models", "must be non-empty paths"
        )
        if self.function is not None:
            mod, _, name = self.function.rpartition(":")
            _require(
                bool(mod.strip()) and bool(name.strip()),
                "function",
                f"expected 'package.module:function' or 'path/to/file.py:function', got {self.function!r}",
            )
        for key in ("model_weight", "function_weight", "length_penalty"):
            _require(_finite(getattr(self, key)), key, f"must be a finite number, got {getattr(self, key)}")
        _require(self.length_penalty >= 0, "length_penalty", f"must be >= 0, got {self.length_penalty}")
        if self.clip is not None:
            _require(_finite(self.clip) and self.clip > 0, "clip", f"must be > 0 (or null), got {self.clip}")
        if self.missing_eos_penalty is not None:
            _require(
                _finite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0,
                "missing_eos_penalty",
                f"must be a finite number >= 0 (or null), got {self.missing_eos_penalty}",
            )
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")


@dataclass
class KLConfig:
    """KL(π ‖ π_ref) penalty: coefficient (fixed, or adapted towards `target` as in Ziegler et al.
    2019) and estimator (k1 in the per-token reward as InstructGPT; k2 / k3 in the loss as GRPO)."""

    coef: float = 0.05
    """KL penalty coefficient (fixed, or the start of the adaptive controller)"""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """k1 (in the reward, InstructGPT), k2 or k3 (in the loss, GRPO)"""
    adaptive: bool = False
    """adapt the coefficient towards `target` (Ziegler et al. 2019)"""
    target: float = 6.0
    """target KL per sequence for the adaptive controller (nats)"""
    horizon: int = 10000
    """adaptive controller horizon (steps)"""

    def validate(self) -> None:
        _require(
            _finite(self.coef) and self.coef >= 0, "coef", f"must be a finite number >= 0, got {self.coef}"
        )
        _require(_finite(self.target) and self.target > 0, "target", f"must be > 0, got {self.target}")
        _require(self.horizon >= 1, "horizon", f"must be >= 1, got {self.horizon}")
        _require(
            not self.adaptive or self.coef > 0,
            "coef",
            "must be > 0 with adaptive: true (the controller scales it multiplicatively)",
        )


@dataclass
class WatchConfig:
    """Reward-hacking warnings (printed once per onset, see `fastalign.rollout.watch`).

    - length drift: mean response length moves more than `length_drift` (a fraction) away from its
      mean over the first `length_window` steps;
    - KL above `kl_threshold` (nats per sequence);
    - reward rising while KL blows up: over the last `reward_kl_window` steps the reward rose and KL
      grew more than `kl_blowup` × max(KL then, `kl_floor`) (the floor keeps a start from KL ≈ 0
      from counting as an explosion)."""

    length_drift: float = 1.0
    """warn when mean response length moves this fraction from its start"""
    length_window: int = 10
    """steps that define the starting length"""
    kl_threshold: float = 20.0
    """warn when KL per sequence passes this (nats)"""
    reward_kl_window: int = 10
    """steps over which reward-up-while-KL-explodes is checked"""
    kl_blowup: float = 4.0
    """KL growth factor that counts as an explosion"""
    kl_floor: float = 1.0
    """KL floor for that growth (a start near 0 is not an explosion)"""

    def validate(self) -> None:
        _require(self.length_drift > 0, "length_drift", f"must be > 0, got {self.length_drift}")
        _require(self.length_window >= 1, "length_window", f"must be >= 1, got {self.length_window}")
        _require(self.kl_threshold > 0, "kl_threshold", f"must be > 0, got {self.kl_threshold}")
        _require(self.reward_kl_window >= 1, "reward_kl_window", f"must be >= 1, got {self.reward_kl_window}")
        _require(self.kl_blowup > 1, "kl_blowup", f"must be > 1, got {self.kl_blowup}")
        _require(self.kl_floor > 0, "kl_floor", f"must be > 0, got {self.kl_floor}")
