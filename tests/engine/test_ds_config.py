"""build_ds_config: "auto" filled from the recipe, contradictions are errors naming both values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastalign.engine import build_ds_config, ds_builds_optimizer, frozen_ds_config

RECIPE = dict(
    stage=3,
    batch_size=2,
    grad_accum=4,
    max_grad_norm=1.0,
    bf16=True,
    lr=1e-5,
    weight_decay=0.0,
    betas=(0.9, 0.95),
    world=2,
)


def test_generated_config_from_the_recipe():
    ds = build_ds_config(None, **RECIPE)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3}
    assert "optimizer" not in ds and not ds_builds_optimizer(ds)


def test_auto_fields_are_filled_and_other_user_keys_kept(tmp_path):
    user = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "overlap_comm": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = build_ds_config(str(path), **RECIPE, hidden_size=64)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["zero_optimization"]["overlap_comm"] is True
    no_h = build_ds_config(user, **RECIPE)
    assert "reduce_bucket_size" not in no_h["zero_optimization"]  # DeepSpeed's default
    assert user["train_batch_size"] == "auto"  # the caller's dict is not modified


@pytest.mark.parametrize(
    ("user", "field", "values"),
    [
        ({"train_batch_size": 32}, "train_batch_size", ("32", "16")),
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu", ("8", "2")),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps", ("1", "4")),
        ({"gradient_clipping": 0.5}, "gradient_clipping", ("0.5", "1.0")),
        ({"bf16": {"enabled": False}}, "bf16.enabled", ("False", "True")),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", ("2", "3")),
    ],
)
def test_contradictions_name_the_field_and_both_values(user, field, values):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        build_ds_config(user, **RECIPE)
    for v in values:
        assert v in str(e.value)


def test_bad_inputs():
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        build_ds_config("/nonexistent/nope.json", **RECIPE)
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        build_ds_config("{not json", **RECIPE)
    with pytest.raises(ValueError, match="scheduler"):
        build_ds_config({"scheduler": {"type": "WarmupLR"}}, **RECIPE)
    with pytest.raises(ValueError, match="'optimizer' section"):
        build_ds_config({"optimizer": {"type": "AdamW"}}, **RECIPE)
    with pytest.raises(ValueError, match="fp16"):
        build_ds_config({"fp16": {"enabled": True}}, **RECIPE)
    with pytest.raises(ValueError, match=r"offload_param.*stage 3"):
        build_ds_config(None, **{**RECIPE, "stage": 2}, offload_param="cpu")
    with pytest.raises(ValueError, match="offload_optimizer"):
        build_ds_config(None, **RECIPE, offload_optimizer="nvme")
    with pytest.raises(ValueError, match="no recipe value"):
        build_ds_config({"zero_optimization": {"sub_group_size": "auto"}}, **RECIPE)
    with pytest.raises(ValueError, match="batch_size"):
        build_ds_config(None, **{**RECIPE, "batch_size": 0})


def test_offload_adds_deepspeed_adamw_and_frozen_config_drops_it():
    ds = build_ds_config(None, **RECIPE, offload_optimizer="cpu", offload_param="cpu")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-5, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8},
    }
    assert ds_builds_optimizer(ds)
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr"):
        build_ds_config({"optimizer": {"params": {"lr": 3e-4}}}, **RECIPE, offload_optimizer="cpu")
    frozen = frozen_ds_config(ds)
    assert "optimizer" not in frozen and "offload_optimizer" not in frozen["zero_optimization"]
    assert frozen["zero_optimization"]["stage"] == 3
    assert frozen["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" in ds  # the trainable config is untouched


def test_import_is_light():
    code = "import sys, fastalign.engine; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
