"""Reward-hacking watch: each warning fires once, at the step its condition starts, and never on
benign curves."""

from __future__ import annotations

import math

import pytest

from fastalign.config import WatchConfig
from fastalign.rollout.watch import RewardHackingWatch

CFG = WatchConfig(length_drift=0.5, length_window=3, kl_threshold=20.0, reward_kl_window=3, kl_blowup=4.0)


def run(watch: RewardHackingWatch, rows: list[dict], start: int = 1) -> dict[int, list[str]]:
    """step -> warning lines, for the steps that produced any."""
    out = {}
    for step, m in enumerate(rows, start=start):
        lines = watch.update(step, m)
        if lines:
            out[step] = lines
    return out


def metrics(reward, kl, length):
    return {"reward/mean": reward, "kl": kl, "response/length": length}


def test_length_drift_fires_once_at_onset(capsys):
    lengths = [10, 10, 10, 12, 16, 17, 18, 15]
    got = run(RewardHackingWatch(CFG), [metrics(0.0, 1.0, x) for x in lengths])
    assert list(got) == [5] and len(got[5]) == 1
    assert "response length 16.0 drifted +60%" in got[5][0] and got[5][0].startswith("[watch] step 5:")
    assert capsys.readouterr().err.count("[watch]") == 1  # printed once, not every step it lasts


def test_length_collapse_and_rearm():
    lengths = [10, 10, 10, 4, 4, 9, 3]  # collapse at 4, back to normal at 6, collapses again at 7
    got = run(RewardHackingWatch(CFG), [metrics(0.0, 1.0, x) for x in lengths])
    assert list(got) == [4, 7] and "-60%" in got[4][0]


def test_kl_threshold_fires_once():
    kls = [1.0, 5.0, 25.0, 30.0, 22.0, 10.0]
    got = run(RewardHackingWatch(CFG), [metrics(0.0, k, 10) for k in kls])
    assert list(got) == [3] and "passed kl_threshold=20" in got[3][0]


def test_reward_up_while_kl_explodes():
    rewards = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    kls = [0.5, 0.6, 1.0, 2.0, 5.0, 9.0]  # at step 5: 5.0 > 4 × max(0.6, floor 1.0) over 3 steps
    got = run(RewardHackingWatch(CFG), [metrics(r, k, 10) for r, k in zip(rewards, kls, strict=True)])
    assert list(got) == [5] and "possible reward hacking" in got[5][0]


def test_raw_reward_preferred_over_normalised():
    """With normalised rewards reward/mean stays ≈ 0; the watch reads reward/raw_mean instead."""
    rows = [
        {"reward/mean": 0.0, "reward/raw_mean": float(i), "kl": k, "response/length": 10}
        for i, k in enumerate([0.5, 0.6, 1.0, 2.0, 5.0])
    ]
    assert list(run(RewardHackingWatch(CFG), rows)) == [5]


@pytest.mark.parametrize(
    "rows",
    [
        # reward rises, KL grows slowly from 0 (the floor keeps 0 → 3 from counting as an explosion)
        [metrics(0.1 * i, 0.3 * i, 10 + (i % 2)) for i in range(30)],
        # KL explodes but the reward falls: not the hacking pattern (and stays under the threshold)
        [metrics(-0.1 * i, 0.5 * 2**i if i < 5 else 16.0, 10) for i in range(12)],
        # missing / non-finite metrics are skipped, not misread
        [{"reward/mean": math.nan, "kl": None, "response/length": 10.0}] * 8 + [{}] * 3,
    ],
)
def test_benign_sequences_do_not_warn(rows, capsys):
    assert run(RewardHackingWatch(CFG), rows) == {}
    assert capsys.readouterr().err == ""


def test_state_dict_resume_gives_the_same_warnings(monkeypatch, capsys):
    rows = [
        metrics(float(i), [0.5, 0.6, 1.0, 2.0, 5.0, 30.0, 9.0][i], [10, 10, 10, 11, 16, 20, 10][i])
        for i in range(7)
    ]
    whole = run(RewardHackingWatch(CFG), rows)
    first = RewardHackingWatch(CFG)
    head = run(first, rows[:4])
    second = RewardHackingWatch(CFG)
    second.load_state_dict(first.state_dict())
    tail = run(second, rows[4:], start=5)
    assert whole == {**head, **tail} and sorted(whole) == [5, 6]
    assert len(whole[5]) == 2  # length drift and reward-vs-KL start together at step 5
    monkeypatch.setenv("RANK", "1")  # other ranks return the lines but do not print them
    capsys.readouterr()
    assert run(RewardHackingWatch(CFG), rows) == whole
    assert capsys.readouterr().err == ""


def test_watch_config_validate():
    with pytest.raises(ValueError, match="kl_blowup: must be > 1"):
        WatchConfig(kl_blowup=1.0).validate()
    with pytest.raises(ValueError, match="length_window: must be >= 1"):
        WatchConfig(length_window=0).validate()
