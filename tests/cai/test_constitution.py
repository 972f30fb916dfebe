"""Constitution files: the shipped default, user YAML/JSON files, and clear errors for bad ones;
the shipped cai configs load; the prompt builders render what the model is asked."""

import json
from pathlib import Path

import pytest

from fastalign.cai.constitution import DEFAULT_FEEDBACK, load_constitution, pick

ROOT = Path(__file__).resolve().parents[2]


def test_default_constitution_ships_a_dozen_complete_principles():
    principles = load_constitution("default")
    assert 10 <= len(principles) <= 16
    assert len({p.id for p in principles}) == len(principles)
    for p in principles:
        assert p.critique.endswith(".") and p.revision.startswith("Please rewrite")
        assert p.feedback.startswith("Which") and p.feedback != DEFAULT_FEEDBACK


def test_yaml_and_json_files_load_alike(tmp_path):
    items = [
        {"id": "a", "critique": "Critique A.", "revision": "Revise A.", "feedback": "Which is A?"},
        {"id": "b", "critique": " Critique B. ", "revision": "Revise B."},
    ]
    (tmp_path / "c.json").write_text(json.dumps({"principles": items}))
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(items))
    for name in ("c.json", "c.yaml"):
        ps = load_constitution(str(tmp_path / name))
        assert [p.id for p in ps] == ["a", "b"]
        assert ps[1].critique == "Critique B."  # stripped
        assert ps[0].feedback == "Which is A?" and ps[1].feedback == DEFAULT_FEEDBACK


BAD = [
    ("- {id: a, critique: x}\n", r"principle 0 \(id 'a'\): missing field 'revision'"),
    (
        "- {id: a, critique: x, revision: y}\n- {id: b, critque: x, revision: y}\n",
        r"principle 1 \(id 'b'\): unknown field.*critque",
    ),
    (
        "- {id: a, critique: '', revision: y}\n",
        r"principle 0 \(id 'a'\): field 'critique' must be a non-empty",
    ),
    ("- {id: a, critique: x, revision: [y]}\n", r"field 'revision' must be a non-empty string"),
    (
        "- {id: a, critique: x, revision: y}\n- {id: a, critique: z, revision: w}\n",
        r"principle 1 \(id 'a'\): duplicate id",
    ),
    ("- just a string\n", r"principle 0: expected a mapping"),
    ("principles: []\n", r"expected a non-empty list of principles"),
    ("{id: a, critique: x, revision: y}\n", r"expected a non-empty list of principles"),
    ("- {id: a, critique: [unclosed\n", r"not valid YAML"),
]


@pytest.mark.parametrize("text,match", BAD)
def test_bad_constitution_files_name_file_principle_and_field(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_constitution(str(path))
    assert str(path) in str(e.value)


def test_missing_constitution_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_constitution(str(tmp_path / "nope.yaml"))
    (tmp_path / "c.json").write_text('[{"id": "a",]')
    with pytest.raises(ValueError, match=r"c\.json: not valid JSON"):
        load_constitution(str(tmp_path / "c.json"))


def test_pick_follows_the_callers_rng():
    import random

    ps = load_constitution("default")
    a = [pick(ps, random.Random(7)).id for _ in range(3)]
    assert a == [pick(ps, random.Random(7)).id for _ in range(3)]
    rng = random.Random(1)
    assert len({pick(ps, rng).id for _ in range(200)}) == len(ps)  # every principle gets drawn


@pytest.mark.parametrize("step", ["revise", "label"])
def test_shipped_cai_configs_load_and_name_existing_files(step, monkeypatch):
    from fastalign.cai.config import CAI_RECIPES
    from fastalign.config import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(CAI_RECIPES[step], f"configs/cai_{step}.yaml")
    assert cfg.output_dir.startswith("runs/")
    assert Path(cfg.prompts).is_file() and cfg.constitution == "default"
    with pytest.raises(ValueError, match=r"generation\.max_new_tokens"):
        load_config(CAI_RECIPES[step], f"configs/cai_{step}.yaml", ["generation.max_new_tokens=0"])
    with pytest.raises(ValueError, match=r"rouns|Unknown key"):
        load_config(CAI_RECIPES[step], f"configs/cai_{step}.yaml", ["rouns=2"])


def test_label_config_needs_prompts_or_responses():
    from fastalign.cai.config import LabelConfig
    from fastalign.config import load_config

    with pytest.raises(ValueError, match="prompts"):
        load_config(LabelConfig, None, ["model.path=x"])
    cfg = load_config(LabelConfig, None, ["responses=r.jsonl", "feedback_model.path=fb"])
    assert cfg.feedback().path == "fb"
    cfg = load_config(LabelConfig, None, ["responses=r.jsonl", "model.path=m"])
    assert cfg.feedback() is cfg.model  # empty feedback_model: the policy answers


def test_red_team_prompts_file_is_well_formed():
    from fastalign.cai.prompts import load_prompts

    prompts = load_prompts(str(ROOT / "examples" / "cai" / "red_team_prompts.jsonl"))
    assert len(prompts) >= 24 and len(set(prompts)) == len(prompts)
