"""Recipe configuration: one dataclass tree per training method, filled from YAML plus dotted
overrides, validated, with errors that name the key, its source and what was expected.

    cfg = load_config(DPORecipe, "configs/dpo.yaml", ["train.lr=1e-5", "model.gguf_file=null"])

- `sections.py`: the shared sections (model, data, prompt data, train / rollout train, engine,
  generation);
- `methods.py`: each method's section (sft, rm, dpo, kto, ppo, grpo, online_dpo) and the online
  recipes' reward / kl / watch sections;
- `recipes.py`: the recipe trees and `RECIPES` (command name -> recipe class);
- `loader.py`: YAML + overrides -> typed dataclasses (`load_config`, `save_config`,
  `config_to_dict`), and `field_docs` (the one-line meaning of every key, for `--help`).

Torch-free: the CLI imports this at startup.
"""

from fastalign.config.loader import config_to_dict, load_config, save_config
from fastalign.config.methods import (
    GRPO_AGGS,
    DPOConfig,
    GRPOConfig,
    KLConfig,
    KTOConfig,
    OnlineDPOConfig,
    PPOConfig,
    RewardConfig,
    RMConfig,
    SFTConfig,
    WatchConfig,
)
from fastalign.config.recipes import (
    RECIPES,
    DPORecipe,
    GRPORecipe,
    KTORecipe,
    OnlineDPORecipe,
    PPORecipe,
    RMRecipe,
    SFTRecipe,
)
from fastalign.config.sections import (
    DataConfig,
    EngineConfig,
    GenerationConfig,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    PromptDataConfig,
    RolloutTrainConfig,
    TrainConfig,
)

__all__ = [
    "GRPO_AGGS",
    "RECIPES",
    "DPOConfig",
    "DPORecipe",
    "DataConfig",
    "EngineConfig",
    "GRPOConfig",
    "GRPORecipe",
    "GenerationConfig",
    "KLConfig",
    "KTOConfig",
    "KTORecipe",
    "LoopConfig",
    "LoraConfig",
    "ModelConfig",
    "OnlineDPOConfig",
    "OnlineDPORecipe",
    "PPOConfig",
    "PPORecipe",
    "PromptDataConfig",
    "RMConfig",
    "RMRecipe",
    "RewardConfig",
    "RolloutTrainConfig",
    "SFTConfig",
    "SFTRecipe",
    "TrainConfig",
    "WatchConfig",
    "config_to_dict",
    "load_config",
    "save_config",
]
