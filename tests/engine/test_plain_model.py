"""The engine helpers on a plain (non-DeepSpeed) model: same results as the models layer."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_same_float32_function
from repo_assets import ASSETS


@pytest.fixture(scope="module")
def model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fastalign.models import load_causal_lm

    return load_causal_lm(str(ASSETS / "models" / "stories260k"), dtype="float32", attn_implementation="sdpa")


def test_hidden_states_equal_the_decoder_output_and_restore_the_head(model):
    from fastalign.engine import hidden_states
    from fastalign.models import decoder_hidden_states

    ids = torch.randint(3, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    head = model.lm_head
    h = hidden_states(model, ids, mask)  # (B, T, H)
    assert h.shape == (2, 9, 64)
    torch.testing.assert_close(h, decoder_hidden_states(model, ids, mask), rtol=0, atol=0)
    assert model.lm_head is head
    logits = model(input_ids=ids, attention_mask=mask).logits
    # the head is a float32 matmul: its float64 twin on the same h and weights is the truth
    truth = h.double() @ head.weight.double().T
    assert_same_float32_function("logits vs h @ W.T", logits, h @ head.weight.T, truth)


def test_fused_head_params_without_zero3_is_the_tied_parameter(model):
    from fastalign.engine import fused_head_params

    with fused_head_params(model) as (weight, bias):
        assert weight is model.model.embed_tokens.weight  # tied: the embedding matrix itself
        assert bias is None


def test_zero_init_below_stage_3_is_a_null_context():
    from fastalign.engine import zero_init

    with zero_init(2, {"zero_optimization": {"stage": 2}}):
        layer = torch.nn.Linear(4, 3)
    assert layer.weight.numel() == 12 and not hasattr(layer.weight, "ds_id")
