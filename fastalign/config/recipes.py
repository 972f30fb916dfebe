"""The recipes: one dataclass tree per training method (the shared sections, then the method's
own), and `RECIPES`, the map from command name to recipe class that the CLI, `fastalign launch`
and the recipe registry (`fastalign.recipes`) share.

The two bases only collect the sections every offline (model, data, train) or online (model,
prompt data, rollout train, generation, reward, kl, watch) recipe has, and hold no behaviour; each
recipe adds its method's section, then `engine` (the order of config.yaml and of error listings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fastalign.config import methods as m
from fastalign.config import sections as s


@dataclass
class OfflineRecipe:
    method: ClassVar[str]
    help: ClassVar[str]
    model: s.ModelConfig = field(default_factory=s.ModelConfig)
    data: s.DataConfig = field(default_factory=s.DataConfig)
    train: s.TrainConfig = field(default_factory=s.TrainConfig)


@dataclass
class OnlineRecipe:
    method: ClassVar[str]
    help: ClassVar[str]
    model: s.ModelConfig = field(default_factory=s.ModelConfig)
    data: s.PromptDataConfig = field(default_factory=s.PromptDataConfig)
    train: s.RolloutTrainConfig = field(default_factory=s.RolloutTrainConfig)
    generation: s.GenerationConfig = field(default_factory=s.GenerationConfig)
    reward: m.RewardConfig = field(default_factory=m.RewardConfig)
    kl: m.KLConfig = field(default_factory=m.KLConfig)
    watch: m.WatchConfig = field(default_factory=m.WatchConfig)


@dataclass
class SFTRecipe(OfflineRecipe):
    method: ClassVar[str] = "sft"
    help: ClassVar[str] = "supervised fine-tuning"
    sft: m.SFTConfig = field(default_factory=m.SFTConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


@dataclass
class RMRecipe(OfflineRecipe):
    method: ClassVar[str] = "rm"
    help: ClassVar[str] = "Bradley-Terry reward model"
    rm: m.RMConfig = field(default_factory=m.RMConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


@dataclass
class DPORecipe(OfflineRecipe):
    method: ClassVar[str] = "dpo"
    help: ClassVar[str] = "DPO family: every DPO loss type, IPO, SimPO, ORPO"
    dpo: m.DPOConfig = field(default_factory=m.DPOConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


@dataclass
class KTORecipe(OfflineRecipe):
    method: ClassVar[str] = "kto"
    help: ClassVar[str] = "KTO on unpaired desirable/undesirable completions"
    kto: m.KTOConfig = field(default_factory=m.KTOConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


@dataclass
class PPORecipe(OnlineRecipe):
    method: ClassVar[str] = "ppo"
    help: ClassVar[str] = "PPO with policy, reference, reward and value models"
    ppo: m.PPOConfig = field(default_factory=m.PPOConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


@dataclass
class GRPORecipe(OnlineRecipe):
    method: ClassVar[str] = "grpo"
    help: ClassVar[str] = "GRPO / Dr. GRPO / RLOO: group advantages, no value model"
    # GRPO puts the KL in the loss, with the k3 estimator (DeepSeekMath)
    kl: m.KLConfig = field(default_factory=lambda: m.KLConfig(coef=0.04, estimator="k3"))
    grpo: m.GRPOConfig = field(default_factory=m.GRPOConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


@dataclass
class OnlineDPORecipe(OnlineRecipe):
    method: ClassVar[str] = "online-dpo"
    help: ClassVar[str] = "online / iterative DPO on the policy's own ranked samples"
    # kl: only the logged KL; online_dpo.beta is the strength
    online_dpo: m.OnlineDPOConfig = field(default_factory=m.OnlineDPOConfig)
    engine: s.EngineConfig = field(default_factory=s.EngineConfig)


RECIPES: dict[str, type] = {
    r.method: r for r in (SFTRecipe, RMRecipe, DPORecipe, KTORecipe, PPORecipe, GRPORecipe, OnlineDPORecipe)
}
