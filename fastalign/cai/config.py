"""Recipes of `fastalign cai revise` and `fastalign cai label`: YAML + dotted overrides through
`fastalign.config.load_config`, like the trainers (same error messages, same `--print-config`).

Kept import-light (no torch): the CLI loads these before anything heavy.

Determinism: `seed` fixes everything. Principle choices use one RNG per prompt (seeded from
`seed` and the prompt's index); sampling uses `torch.manual_seed` per batch of
`generation.batch_size` prompts, and batches are fixed slices of the prompt list (prompt i is
always in batch i // batch_size with the same batch mates), so a resumed run writes the same rows
as an uninterrupted one. That is why `generation.batch_size` is part of a run's identity: change
it and resuming is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fastalign.config import GenerationConfig, ModelConfig
from fastalign.config.checks import require as _require

# keys that may change between a run and its resumption (they do not change any row)
RESUME_FREE_KEYS = ("resume", "stop_after", "progress")


def _gen(max_new_tokens: int, temperature: float) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=8)


@dataclass
class ReviseConfig:
    """critique -> revision: SFT rows (`<output_dir>/sft.jsonl`) and traces (`trace.jsonl`)."""

    method: ClassVar[str] = "cai_revise"
    model: ModelConfig = field(default_factory=ModelConfig)
    """the model that answers, critiques and revises"""
    prompts: str = ""
    """JSONL/JSON/parquet/csv rows with a 'prompt' string (red-team prompts)"""
    constitution: str = "default"
    """'default' (the shipped 12 principles) or a YAML/JSON file of principles"""
    few_shot: str | None = None
    """JSONL of worked critique/revision examples (see docs/cai.md)"""
    output_dir: str = "runs/cai_revise"
    """run folder: sft.jsonl (revised rows), trace.jsonl (every round)"""
    rounds: int = 1
    """critique -> revision rounds per prompt"""
    row_format: Literal["auto", "text", "chat"] = "auto"
    """SFT rows as 'chat' messages or 'text' ('auto': chat when the tokenizer has a template)"""
    generation: GenerationConfig = field(default_factory=lambda: _gen(128, 0.7))
    """sampling of answers, critiques and revisions"""
    seed: int = 0
    """seed of principle choices and sampling"""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N' or 'auto'"""
    max_prompts: int | None = None
    """use the first N prompts of the file"""
    stop_after: int | None = None
    """stop after N newly finished prompts (chunked runs; resume later)"""
    resume: bool = True
    """continue an earlier run in output_dir (false: start over, deleting its outputs)"""
    progress: bool = True
    """progress bar on a terminal, plain lines otherwise"""

    def validate(self) -> None:
        _validate_common(self)
        _require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")


@dataclass
class LabelConfig:
    """AI preference labels: `<output_dir>/pairs.jsonl` (rm / dpo rows) and `trace.jsonl`."""

    method: ClassVar[str] = "cai_label"
    model: ModelConfig = field(default_factory=ModelConfig)
    """the policy that samples responses (not needed with given responses)"""
    feedback_model: ModelConfig = field(default_factory=ModelConfig)
    """the model that judges (empty path: the same as model)"""
    prompts: str = ""
    """prompts to sample responses for (needs model.path)"""
    responses: str | None = None
    """or given responses: rows {prompt, responses: [...]} / {prompt, chosen, rejected}"""
    constitution: str = "default"
    """'default' (the shipped principles) or a YAML/JSON file"""
    output_dir: str = "runs/cai_label"
    """run folder: pairs.jsonl (rm / dpo rows with p_chosen), trace.jsonl"""
    num_responses: int = 2
    """responses sampled per prompt; every pair of them is labelled"""
    row_format: Literal["auto", "text", "chat"] = "auto"
    """pair rows as 'chat' messages or 'text' ('auto': chat when the tokenizer has a template)"""
    generation: GenerationConfig = field(default_factory=lambda: _gen(128, 1.0))
    """sampling of the responses"""
    feedback_batch_size: int = 8
    """questions per feedback-model forward"""
    seed: int = 0
    """seed of principle choices and sampling"""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N' or 'auto'"""
    max_prompts: int | None = None
    """use the first N prompts"""
    stop_after: int | None = None
    """stop after N newly finished prompts (chunked runs; resume later)"""
    resume: bool = True
    """continue an earlier run in output_dir (false: start over)"""
    progress: bool = True
    """progress bar on a terminal, plain lines otherwise"""

    def validate(self) -> None:
        _validate_common(self)
        _require(self.num_responses >= 2, "num_responses", f"must be >= 2, got {self.num_responses}")
        _require(
            self.feedback_batch_size >= 1,
            "feedback_batch_size",
            f"must be >= 1, got {self.feedback_batch_size}",
        )
        if self.responses is not None:
            _require(
                bool(self.feedback_model.path or self.model.path),
                "feedback_model.path",
                "is needed to label given responses (or set model.path)",
            )

    def feedback(self) -> ModelConfig:
        """The feedback model's section: `feedback_model`, or `model` when its path is empty."""
        return self.feedback_model if self.feedback_model.path else self.model


def _validate_common(cfg) -> None:
    _require(cfg.output_dir != "", "output_dir", "must not be empty")
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _require(cfg.device != "", "device", "must not be empty ('cpu', 'cuda', 'cuda:1', 'auto')")
    if not getattr(cfg, "responses", None):
        _require(bool(cfg.prompts), "prompts", "must name a file of prompts (rows with a 'prompt' string)")
        _require(bool(cfg.model.path), "model.path", "must not be empty")
    for key in ("max_prompts", "stop_after"):
        value = getattr(cfg, key)
        _require(value is None or value >= 1, key, f"must be >= 1 (or null), got {value}")


CAI_RECIPES: dict[str, type] = {"revise": ReviseConfig, "label": LabelConfig}
