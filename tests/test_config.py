"""fastalign.config: YAML + dotted overrides -> typed recipe dataclasses, with errors that name the
key, the source and what was expected."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from fastalign.config import (
    RECIPES,
    DataConfig,
    DPORecipe,
    KTORecipe,
    LoraConfig,
    RMRecipe,
    SFTRecipe,
    TrainConfig,
    config_to_dict,
    load_config,
    save_config,
)

OFFLINE = [SFTRecipe, RMRecipe, DPORecipe, KTORecipe]  # the rollout recipes need a reward source


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error(cls=DPORecipe, path=None, overrides=()) -> str:
    with pytest.raises(ValueError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# defaults and schema
# ---------------------------------------------------------------------------------------------
def test_defaults_match_the_spec():
    cfg = load_config(DPORecipe)
    assert cfg.train == TrainConfig()
    assert cfg.train.lr == 5e-6 and cfg.train.adam_betas == [0.9, 0.999] and cfg.train.keep_last == 2
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.data.columns == {} and cfg.data.max_length == 512
    assert cfg.dpo.loss_type == "sigmoid" and cfg.dpo.beta == 0.1 and cfg.dpo.average_log_prob is None
    assert [r.method for r in RECIPES.values()] == ["sft", "rm", "dpo", "kto", "ppo", "grpo", "online-dpo"]
    assert [RECIPES[m] for m in ("sft", "rm", "dpo", "kto")] == OFFLINE
    for cls in OFFLINE:
        assert load_config(cls) == cls()
    # mutable defaults are not shared between instances
    a, b = LoraConfig(), LoraConfig()
    a.target_modules.append("x")
    assert b.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_import_is_light():
    code = "import sys, fastalign.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------
def test_yaml_file_fills_nested_sections(tmp_path):
    path = write(
        tmp_path,
        """
        method: dpo
        model:
          path: assets/models/stories260k
          dtype: float32
          lora: {r: 8, target_modules: [q_proj, v_proj]}
        data:
          train: prefs.jsonl
          columns: {prompt: question, chosen: good}
          max_prompt_length: 128
        train:
          lr: 1e-5          # YAML 1.1 reads this as a string; float fields accept it
          epochs: 2         # int accepted for a float
          max_grad_norm: null
          mixed_precision: 'no'
        dpo: {loss_type: ipo, beta: 0.5}
        """,
    )
    cfg = load_config(DPORecipe, path)
    assert cfg.model.path == "assets/models/stories260k" and cfg.model.dtype == "float32"
    assert cfg.model.lora == LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    assert cfg.data.columns == {"prompt": "question", "chosen": "good"}
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.max_grad_norm is None and cfg.train.mixed_precision == "no"
    assert cfg.dpo.loss_type == "ipo" and cfg.dpo.beta == 0.5
    assert cfg.train.batch_size == 8  # untouched keys keep defaults


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(SFTRecipe, write(tmp_path, "# nothing\n")) == SFTRecipe()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(SFTRecipe, tmp_path / "nope.yaml")


def test_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    msg = error(SFTRecipe, path)
    assert str(path) in msg and "expected a YAML mapping" in msg and "got list" in msg


def test_invalid_yaml_names_file(tmp_path):
    path = write(tmp_path, "train: {lr: [1, 2\n")
    msg = error(SFTRecipe, path)
    assert str(path) in msg and "not valid YAML" in msg


def test_section_not_a_mapping(tmp_path):
    path = write(tmp_path, "train: 3\n")
    assert error(SFTRecipe, path) == f"train: expected a mapping (section), got 3 (int) [in {path}]"


def test_method_key_must_match_recipe(tmp_path):
    path = write(tmp_path, "method: dpo\ntrain: {lr: 1.0e-5}\n")
    assert load_config(DPORecipe, path).train.lr == 1e-5
    msg = error(SFTRecipe, path)
    assert "method" in msg and "'dpo'" in msg and "'sft'" in msg and str(path) in msg
    assert load_config(DPORecipe, None, ["method=dpo"]) == DPORecipe()
    assert "recipe is 'dpo'" in error(DPORecipe, None, ["method=kto"])
    # DPOConfig has a real field called method; that one is type-checked as a Literal
    assert load_config(DPORecipe, None, ["dpo.method=simpo"]).dpo.method == "simpo"


# ---------------------------------------------------------------------------------------------
# unknown keys
# ---------------------------------------------------------------------------------------------
def test_unknown_key_in_file_suggests_closest(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    assert error(SFTRecipe, path) == f"Unknown key 'train.lrr' [in {path}]; did you mean 'train.lr'?"
    path = write(tmp_path, "modle: {path: x}\n", "b.yaml")
    assert error(SFTRecipe, path) == f"Unknown key 'modle' [in {path}]; did you mean 'model'?"
    path = write(tmp_path, "model: {lora: {rank: 4}}\n", "c.yaml")
    assert "Unknown key 'model.lora.rank'" in error(SFTRecipe, path)


def test_unknown_key_in_override():
    assert (
        error(SFTRecipe, None, ["trian.lr=1"])
        == "Unknown key 'trian.lr' [from override]; did you mean 'train.lr'?"
    )
    assert "did you mean 'train.batch_size'" in error(SFTRecipe, None, ["train.batchsize=4"])
    msg = error(SFTRecipe, None, ["zzz=1"])
    assert msg.startswith("Unknown key 'zzz' [from override]") and "model, data, train, sft" in msg
    # section of another recipe
    assert "Unknown key 'dpo.beta'" in error(SFTRecipe, None, ["dpo.beta=0.1"])


def test_override_into_a_leaf_is_an_error():
    msg = error(SFTRecipe, None, ["train.lr.x=1"])
    assert "train.lr is a value (float), not a section" in msg and "'x'" in msg


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------
def test_overrides_apply_after_file_in_order(tmp_path):
    path = write(tmp_path, "train: {lr: 0.1, batch_size: 4}\nmodel: {gguf_file: m.gguf}\n")
    cfg = load_config(
        DPORecipe,
        path,
        [
            "train.lr=1e-5",
            "train.lr=2e-5",
            "data.columns.prompt=question",
            "data.columns.chosen = good",
            "model.lora.target_modules=[q_proj,v_proj]",
            "train.adam_betas=[0.8, 0.95]",
            "model.gguf_file=null",
            "train.max_steps=10",
            "train.fused=false",
            "train.mixed_precision=no",  # YAML 1.1 'no' is a bool; the raw text is used for a str field
            "model.path=123",  # likewise a number for a str field
            "data.max_prompt_length=~",
        ],
    )
    assert cfg.train.lr == 2e-5 and cfg.train.batch_size == 4
    assert cfg.data.columns == {"prompt": "question", "chosen": "good"}
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.adam_betas == [0.8, 0.95]
    assert cfg.model.gguf_file is None and cfg.train.max_steps == 10 and cfg.train.fused is False
    assert cfg.train.mixed_precision == "no" and cfg.model.path == "123"
    assert cfg.data.max_prompt_length is None


def test_override_whole_dict_and_section():
    cfg = load_config(SFTRecipe, None, ["data.columns={prompt: q, completion: a}", "model.lora={r: 4}"])
    assert cfg.data.columns == {"prompt": "q", "completion": "a"}
    assert cfg.model.lora == LoraConfig(r=4)  # a section override replaces the section


def test_override_syntax_errors():
    assert "expected KEY=VALUE" in error(SFTRecipe, None, ["train.lr"])
    assert "empty key" in error(SFTRecipe, None, ["=3"])
    assert "empty key" in error(SFTRecipe, None, ["train..lr=3"])
    assert "not valid YAML" in error(SFTRecipe, None, ["train.adam_betas=[0.9,"])


# ---------------------------------------------------------------------------------------------
# type errors
# ---------------------------------------------------------------------------------------------
def test_wrong_type_message_override_and_file(tmp_path):
    assert (
        error(SFTRecipe, None, ["train.lr=abc"])
        == "train.lr: expected float, got 'abc' (str) [from override]"
    )
    path = write(tmp_path, "train:\n  lr: abc\n")
    assert error(SFTRecipe, path) == f"train.lr: expected float, got 'abc' (str) [in {path}]"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=true", "train.batch_size: expected int, got True (bool)"),  # bool is not an int
        ("train.batch_size=2.5", "train.batch_size: expected int, got 2.5 (float)"),
        ("train.lr=true", "train.lr: expected float, got True (bool)"),
        ("train.fused=1", "train.fused: expected bool, got 1 (int)"),
        ("train.max_steps=abc", "train.max_steps: expected int | null, got 'abc' (str)"),
        ("train.adam_betas=0.9", "train.adam_betas: expected list[float], got 0.9 (float)"),
        ("train.adam_betas=[0.9, x]", "train.adam_betas[1]: expected float, got 'x' (str)"),
        (
            "model.lora.target_modules=[q, [k]]",
            "model.lora.target_modules[1]: expected str, got ['k'] (list)",
        ),
        ("data.columns=[a]", "data.columns: expected dict[str, str], got ['a'] (list)"),
        ("data.columns.prompt=[a]", "data.columns.prompt: expected str, got ['a'] (list)"),
        ("model.lora=3", "model.lora: expected a mapping (section), got 3 (int)"),
        ("model.lora={r: x}", "model.lora.r: expected int, got 'x' (str)"),
    ],
)
def test_type_errors(override, expected):
    assert error(DPORecipe, None, [override]) == f"{expected} [from override]"


def test_str_field_rejects_bool_in_file_with_hint(tmp_path):
    path = write(tmp_path, "train:\n  mixed_precision: no\n")
    msg = error(SFTRecipe, path)
    assert msg.startswith(
        f"train.mixed_precision: expected one of 'auto', 'no', 'bf16', 'fp16', got False (bool) [in {path}]"
    )
    assert "quote" in msg
    path = write(tmp_path, "model:\n  path: 5\n", "b.yaml")
    assert error(SFTRecipe, path) == f"model.path: expected str, got 5 (int) [in {path}]"


def test_literal_error_lists_choices():
    msg = error(DPORecipe, None, ["model.dtype=fp8"])
    choices = "'auto', 'float32', 'bfloat16', 'float16'"
    assert msg == f"model.dtype: expected one of {choices}, got 'fp8' (str) [from override]"
    assert "'cosine', 'linear', 'constant'" in error(DPORecipe, None, ["train.schedule=step"])
    assert "'auto', 'preference', 'hh', 'chat', 'kto', 'sft'" in error(DPORecipe, None, ["data.format=csv"])


def test_optional_bool():
    assert load_config(DPORecipe, None, ["dpo.average_log_prob=true"]).dpo.average_log_prob is True
    assert load_config(DPORecipe, None, ["dpo.average_log_prob=null"]).dpo.average_log_prob is None
    assert "expected bool | null" in error(DPORecipe, None, ["dpo.average_log_prob=3"])


# ---------------------------------------------------------------------------------------------
# validate()
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "override", "expected"),
    [
        (SFTRecipe, "train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        (SFTRecipe, "train.lr=0", "train.lr: must be a finite number > 0, got 0.0"),
        (SFTRecipe, "train.lr=-1e-5", "train.lr: must be a finite number > 0"),
        (SFTRecipe, "train.grad_accum=0", "train.grad_accum: must be >= 1"),
        (SFTRecipe, "train.warmup_ratio=1", "train.warmup_ratio: must be in [0, 1), got 1.0"),
        (SFTRecipe, "train.keep_last=0", "train.keep_last: must be >= 1, got 0"),
        (SFTRecipe, "train.adam_betas=[0.9]", "train.adam_betas: must be two numbers in [0, 1)"),
        (SFTRecipe, "train.max_grad_norm=0", "train.max_grad_norm: must be > 0"),
        (SFTRecipe, "train.log_every=0", "train.log_every: must be >= 1"),
        (SFTRecipe, "train.max_steps=0", "train.max_steps: must be >= 1"),
        (SFTRecipe, "data.eval_fraction=1.0", "data.eval_fraction: must be in [0, 1), got 1.0"),
        (SFTRecipe, "data.eval_fraction=-0.1", "data.eval_fraction: must be in [0, 1)"),
        (SFTRecipe, "data.max_prompt_length=512", "data.max_prompt_length: must be in [1, max_length=512)"),
        (SFTRecipe, "model.lora.dropout=1", "model.lora.dropout: must be in [0, 1)"),
        (SFTRecipe, "model.lora.r=-1", "model.lora.r: must be >= 0"),
        (DPORecipe, "dpo.loss_type=bogus", "dpo.loss_type: expected one of 'sigmoid', 'robust'"),
        (DPORecipe, "dpo.beta=0", "dpo.beta: must be > 0"),
        (DPORecipe, "dpo.label_smoothing=0.5", "dpo.label_smoothing: must be in [0, 0.5)"),
        (KTORecipe, "kto.desirable_weight=0", "kto.desirable_weight: must be > 0"),
        (RMRecipe, "rm.center_coef=-1", "rm.center_coef: must be >= 0"),
    ],
)
def test_validate_errors_name_the_key(cls, override, expected):
    msg = error(cls, None, [override])
    assert msg.startswith(expected), msg


def test_validate_cross_field(tmp_path):
    msg = error(SFTRecipe, None, ["train.warmup_steps=10", "train.warmup_ratio=0.1"])
    assert msg.startswith("train.warmup_ratio: set either warmup_steps (10) or warmup_ratio (0.1), not both")
    path = write(tmp_path, "data: {eval: e.jsonl, eval_fraction: 0.1}\n")
    msg = error(SFTRecipe, path)
    assert (
        msg.startswith("data.eval_fraction: set either data.eval or data.eval_fraction") and str(path) in msg
    )


def test_every_dpo_loss_type_validates():
    from fastalign.losses.preference import DPO_LOSS_TYPES

    for loss_type in DPO_LOSS_TYPES:
        assert load_config(DPORecipe, None, [f"dpo.loss_type={loss_type}"]).dpo.loss_type == loss_type


# ---------------------------------------------------------------------------------------------
# save / round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", OFFLINE)
def test_save_load_round_trip(tmp_path, cls):
    overrides = [
        "model.path=models/x",
        "model.gguf_file=m.gguf",
        "model.lora.r=8",
        "model.lora.target_modules=[q_proj]",
        "data.columns.prompt=question",
        "data.eval=dev.jsonl",
        "train.lr=3e-5",
        "train.max_steps=7",
        "train.max_grad_norm=null",
        "train.mixed_precision=no",
        "train.adam_betas=[0.5, 0.75]",
    ]
    cfg = load_config(cls, None, overrides)
    path = tmp_path / "sub" / "saved.yaml"
    save_config(cfg, path)
    again = load_config(cls, path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    d = config_to_dict(cfg)
    assert next(iter(d)) == "method" and d["method"] == cls.method
    assert d["train"]["lr"] == 3e-5 and d["model"]["lora"]["target_modules"] == ["q_proj"]
    assert dataclasses.is_dataclass(cfg.data) and isinstance(cfg.data, DataConfig)
    # the saved method key guards against loading it as another recipe
    other = next(c for c in RECIPES.values() if c is not cls)
    with pytest.raises(ValueError, match="method"):
        load_config(other, path)
