"""`fastalign.rollout.generate` on the real stories260k Llama, single process."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import assert_within_float32_error, float64_truth, max_err
from repo_assets import ASSETS

from fastalign.config import GenerationConfig
from fastalign.rollout.generate import Generations, generate

MODEL = ASSETS / "models" / "stories260k"

TEXTS = ["Once upon a time", "The cat", "Lily went to the park and saw"]  # different lengths


@pytest.fixture(scope="module")
def lm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from fastalign.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(MODEL))
    model = load_causal_lm(str(MODEL), dtype="float32", attn_implementation="sdpa")
    prompts = [tok(t).input_ids for t in TEXTS]
    return model, tok, prompts


def _greedy(n: int = 12, batch_size: int = 3, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, do_sample=False, batch_size=batch_size, **kw)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_hf_generate_and_batching(lm):
    model, tok, prompts = lm
    batched = generate(model, tok, prompts, _greedy(batch_size=3))
    single = generate(model, tok, prompts, _greedy(batch_size=1))
    two = generate(model, tok, prompts, _greedy(batch_size=2))
    with torch.no_grad():
        expected = [_hf_greedy(model, p, 12) for p in prompts]
    assert batched.response_ids == expected  # left padding does not change a row's tokens
    assert single.response_ids == expected
    assert two.response_ids == expected
    assert batched.prompt_ids == prompts
    assert batched.texts == [tok.decode(r, skip_special_tokens=True) for r in expected]
    assert batched.finished == [False] * 3  # no EOS within 12 tokens: hit max_new_tokens
    assert all(len(r) == 12 for r in batched.response_ids)
    assert batched.logprobs is None


def test_eos_cut_and_finished_flag(lm):
    model, tok, prompts = lm
    full = generate(model, tok, prompts, _greedy(n=16))
    stop_tok = full.response_ids[0][3]  # force EOS on a token row 0 picks at step 4
    cut = generate(model, tok, prompts, _greedy(n=16), eos_token_ids=[stop_tok])
    for row_full, row_cut, fin in zip(full.response_ids, cut.response_ids, cut.finished, strict=True):
        if stop_tok in row_full:
            k = row_full.index(stop_tok) + 1
            assert row_cut == row_full[:k] and fin  # cut right after the first EOS, EOS kept
        else:
            assert row_cut == row_full and not fin
    assert cut.response_ids[0] == full.response_ids[0][:4] and cut.finished[0]
    late = generate(model, tok, prompts, _greedy(n=16), eos_token_ids=[stop_tok], min_new_tokens=8)
    assert all(len(r) >= 8 and stop_tok not in r[:7] for r in late.response_ids)  # EOS suppressed before 8


def test_pad_equal_to_eos_keeps_true_lengths(lm):
    """SmolLM2-style tokenizers pad with the EOS id: rows padded after finishing keep their lengths."""
    model, tok, prompts = lm
    tok = copy.deepcopy(tok)
    tok.pad_token_id = tok.eos_token_id
    full = generate(model, tok, prompts, _greedy(n=16))
    stop_tok = full.response_ids[1][2]
    eos = [tok.eos_token_id, stop_tok]
    batched = generate(model, tok, prompts, _greedy(n=16, batch_size=3), eos_token_ids=eos)
    single = generate(model, tok, prompts, _greedy(n=16, batch_size=1), eos_token_ids=eos)
    assert batched.response_ids == single.response_ids
    assert batched.response_ids[1] == full.response_ids[1][:3] and batched.finished[1]
    unfinished = [i for i, r in enumerate(full.response_ids) if stop_tok not in r]
    for i in unfinished:  # a row padded in the batch keeps all 16 tokens
        assert batched.response_ids[i] == full.response_ids[i] and not batched.finished[i]


def test_stop_string_cut_keeps_stop_string(lm):
    model, tok, prompts = lm
    full = generate(model, tok, prompts[:1], _greedy(n=24))
    words = full.texts[0].split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy text
    cut = generate(model, tok, prompts[:1], _greedy(n=24, stop=[stop]))
    resp = cut.response_ids[0]
    assert cut.finished == [True]
    assert stop in cut.texts[0] and stop not in tok.decode(resp[:-1], skip_special_tokens=True)
    assert resp == full.response_ids[0][: len(resp)] and len(resp) < 24


def test_max_new_tokens_respected(lm):
    model, tok, prompts = lm
    gen = GenerationConfig(max_new_tokens=5, temperature=1.0, batch_size=2)
    g = generate(model, tok, prompts, gen, seed=3)
    assert [len(r) for r in g.response_ids] == [5, 5, 5]
    assert g.finished == [False, False, False]


def test_seed_determinism(lm):
    model, tok, prompts = lm
    gen = GenerationConfig(max_new_tokens=16, temperature=1.0, batch_size=2)
    a = generate(model, tok, prompts, gen, seed=11)
    torch.rand(7)  # global RNG state in between must not matter
    b = generate(model, tok, prompts, gen, seed=11)
    c = generate(model, tok, prompts, gen, seed=12)
    assert a.response_ids == b.response_ids
    assert a.response_ids != c.response_ids
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    generate(model, tok, prompts, gen, seed=11)
    assert torch.equal(torch.rand(4), want)  # the caller's RNG stream is untouched by a seeded call


def test_logprobs_are_sampling_logprobs_not_topk_renormalised(lm):
    model, tok, prompts = lm
    temp = 0.7
    gen = GenerationConfig(max_new_tokens=12, temperature=temp, top_k=5, batch_size=3)
    g = generate(model, tok, prompts, gen, seed=5, return_logprobs=True)
    ref = float64_truth(model)
    gaps, got, truths, plain_err = [], [], [], 0.0
    for p, r, lp in zip(g.prompt_ids, g.response_ids, g.logprobs, strict=True):
        assert len(lp) == len(r) == 12
        with torch.no_grad():
            logits = ref(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / temp  # (N, V) float64
            lp32 = torch.log_softmax(model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / temp, -1)
        lp64 = torch.log_softmax(logits, -1)
        truth = lp64.gather(-1, torch.tensor(r)[:, None])[:, 0]
        got.append(torch.tensor(lp, dtype=torch.float64))
        truths.append(truth)
        top = logits.topk(5, dim=-1)
        # plain float32 error over the 5 candidates of every step: a steadier maximum than 12 values
        plain_err = max(plain_err, max_err(lp32.gather(-1, top.indices), lp64.gather(-1, top.indices)))
        assert all(t in row for t, row in zip(r, top.indices.tolist(), strict=True))  # top_k applied
        renorm = torch.log_softmax(top.values, -1)[top.indices == torch.tensor(r)[:, None]]
        gaps.append((renorm - truth).abs().max().item())
    assert max(gaps) > 1e-2  # the top-5-renormalised log-probs differ: we returned the others
    # the sampler's float32 log-probs (incremental decoding) against float64: at most twice the error
    # of one plain float32 forward, not an atol the size of float32's own error
    assert_within_float32_error("sampling log-probs", torch.cat(got), torch.cat(truths), plain_err)


def test_train_eval_modes_restored(lm):
    model, tok, prompts = lm
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    try:
        generate(model, tok, prompts[:1], _greedy(n=2))
        assert model.training and model.model.layers[1].training
        assert not model.model.layers[0].training
    finally:
        model.eval()


def test_peft_model_generates_like_its_base(lm):
    from peft import LoraConfig, get_peft_model

    model, tok, prompts = lm
    plain = generate(model, tok, prompts, _greedy(n=8))
    lora = LoraConfig(r=2, target_modules=["q_proj"])  # B initialised to 0: the same function
    peft = get_peft_model(copy.deepcopy(model), lora)
    assert generate(peft, tok, prompts, _greedy(n=8)).response_ids == plain.response_ids


def test_empty_and_bad_prompts(lm):
    model, tok, prompts = lm
    empty = generate(model, tok, [], _greedy())
    assert empty == Generations([], [], [], [], None)
    assert generate(model, tok, [], _greedy(), return_logprobs=True).logprobs == []
    too_long = [1] * (model.config.max_position_embeddings - 7)
    with pytest.raises(ValueError, match=r"prompt 1 has 505 tokens.*at most 504"):
        generate(model, tok, [prompts[0], too_long], _greedy(n=8))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, tok, [[]], _greedy())
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tok, prompts, GenerationConfig(top_k=-1))
