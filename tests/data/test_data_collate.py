"""Collators, packing and block_causal_mask: a packed forward of stories260k equals the padded one."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_same_float32_function, float64_truth
from repo_assets import ASSETS

from fastalign.data import KTOCollator, PreferenceCollator, SFTCollator, block_causal_mask, unpack_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = ASSETS / "models" / "stories260k"

PAIRS = [
    {
        "prompt_ids": [1, 300, 301],
        "chosen_ids": [400, 401, 2],
        "rejected_ids": [402, 2],
        "index": 0,
        "margin": 1.0,
    },
    {
        "prompt_ids": [1, 310],
        "chosen_ids": [410, 2],
        "rejected_ids": [411, 412, 413, 414, 2],
        "index": 1,
        "margin": 0.5,
    },
    {
        "prompt_ids": [1, 320, 321, 322, 323],
        "chosen_ids": [2],
        "rejected_ids": [420, 421, 2],
        "index": 2,
        "margin": 2.0,
    },
]
SFT = [
    {"input_ids": [1, 300, 301, 400, 2], "labels": [-100, -100, -100, 400, 2], "index": 0},
    {"input_ids": [1, 350, 351, 352, 353, 354, 2], "labels": [1, 350, 351, 352, 353, 354, 2], "index": 1},
    {"input_ids": [1, 360, 2], "labels": [-100, -100, 2], "index": 2},
]


def test_preference_collator_unpacked_layout():
    b = PreferenceCollator(0)(PAIRS)
    assert b["input_ids"].shape == (6, 8) and b["input_ids"].dtype == torch.long
    assert b["input_ids"][0].tolist() == [1, 300, 301, 400, 401, 2, 0, 0]
    assert b["labels"][0].tolist() == [-100, -100, -100, 400, 401, 2, -100, -100]
    assert b["input_ids"][4].tolist() == [1, 310, 411, 412, 413, 414, 2, 0]  # row B+1 = pair 1 rejected
    assert b["attention_mask"][5].tolist() == [1] * 8 and b["attention_mask"][3].sum() == 5
    assert b["index"].tolist() == [0, 1, 2] and b["margin"].tolist() == [1.0, 0.5, 2.0]
    assert "margin" not in PreferenceCollator(0)(
        [PAIRS[0], {k: v for k, v in PAIRS[1].items() if k != "margin"}]
    )


def test_packed_matches_unpacked_layout():
    u, p = PreferenceCollator(0)(PAIRS), PreferenceCollator(0, packing=True)(PAIRS)
    n = int(u["attention_mask"].sum())
    assert p["input_ids"].shape == p["position_ids"].shape == p["labels"].shape == p["seq_id"].shape == (1, n)
    assert p["num_rows"] == 6 and "attention_mask" not in p and p["index"].tolist() == [0, 1, 2]
    for key, fill in (("input_ids", 0), ("labels", -100)):
        assert torch.equal(unpack_rows(p[key], p["seq_id"], 6, fill=fill), u[key])
    assert p["position_ids"][0, :6].tolist() == list(range(6)) and p["position_ids"][0, 6].item() == 0
    # the first token of every row is never a target, so a global shift never crosses a boundary
    starts = torch.nonzero(p["position_ids"][0] == 0).flatten()
    assert (p["labels"][0, starts] == -100).all() and len(starts) == 6


def test_sft_collator_first_label_ignored():
    b = SFTCollator(0)(SFT)
    assert b["labels"][1].tolist() == [-100, 350, 351, 352, 353, 354, 2]
    assert b["labels"][2].tolist() == [-100, -100, 2, -100, -100, -100, -100]
    p = SFTCollator(0, packing=True)(SFT)
    assert p["num_rows"] == 3 and torch.equal(
        unpack_rows(p["labels"], p["seq_id"], 3, fill=-100), b["labels"]
    )


def test_kto_collator_kl_pairs():
    ex = [
        {"prompt_ids": [1, 5], "completion_ids": [7, 2], "label": True, "index": 0},
        {"prompt_ids": [1, 6, 6], "completion_ids": [8, 8, 8, 2], "label": False, "index": 1},
    ]
    b = KTOCollator(0)(ex)
    assert b["input_ids"].tolist() == [[1, 5, 7, 2, 0, 0, 0], [1, 6, 6, 8, 8, 8, 2]]
    assert b["desirable"].tolist() == [True, False] and b["desirable"].dtype == torch.bool
    assert b["kl_input_ids"].tolist() == [[1, 5, 8, 8, 8, 2], [1, 6, 6, 7, 2, 0]]
    assert b["kl_labels"].tolist() == [[-100, -100, 8, 8, 8, 2], [-100, -100, -100, 7, 2, -100]]
    assert b["kl_attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    one = KTOCollator(0)(ex[:1])
    assert torch.equal(one["kl_input_ids"], one["input_ids"]) and one["index"].tolist() == [0]


def test_block_causal_mask_values_and_unpack_grad():
    seq = torch.tensor([[0, 0, 1, 1, 1]])
    m = block_causal_mask(seq)
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.float32
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert block_causal_mask(seq, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating"):
        block_causal_mask(seq, torch.bool)
    x = torch.randn(1, 5, 3, requires_grad=True)
    y = unpack_rows(x, torch.tensor([[1, 1, 0, 1, 0]]), 3, fill=0.0)
    assert y.shape == (3, 3, 3) and torch.equal(y[1, :3], x[0, [0, 1, 3]]) and (y[2] == 0).all()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _row_logps(model, hidden, labels):
    logits = model.lm_head(hidden)  # (R, T, V)
    tgt = labels[:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    return (logp * (tgt != -100)).sum(-1)  # (R,)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_packed_forward_equals_padded(attn, kind):
    from transformers import AutoModelForCausalLM

    # float64 (norms too: helpers.float64_truth): the check is about which tokens attend to which.
    # Eager still takes its softmax in float32 (transformers' eager_attention_forward), so it agrees
    # to float32 rounding (~1e-6 on these sums of ~1e2), sdpa to ~1e-12. Float32-rounded results are
    # held to the numerics rule against a float64 truth (sdpa, padded), not to an atol the size of
    # their own rounding; in float32, 4 ulps, as there are only 3-6 sums. A masking error moves the
    # sums by far more.
    model = float64_truth(AutoModelForCausalLM.from_pretrained(str(MODEL), attn_implementation=attn)).eval()
    truth_model = float64_truth(AutoModelForCausalLM.from_pretrained(str(MODEL), attn_implementation="sdpa"))
    examples, collator = (PAIRS, PreferenceCollator) if kind == "preference" else (SFT, SFTCollator)
    u, p = collator(0)(examples), collator(0, packing=True)(examples)
    rows = p["num_rows"]
    with torch.no_grad():
        hu = model.model(u["input_ids"], attention_mask=u["attention_mask"]).last_hidden_state  # (R, T, H)
        h64 = truth_model.model(u["input_ids"], attention_mask=u["attention_mask"]).last_hidden_state
        truth = _row_logps(truth_model, h64, u["labels"])  # (R,)
        mask = block_causal_mask(p["seq_id"], torch.float64)

        def packed_hidden(ids):
            return model.model(
                ids, attention_mask=mask, position_ids=p["position_ids"]
            ).last_hidden_state  # (1, N, H)

        hp = packed_hidden(p["input_ids"])
        hp_rows = unpack_rows(hp, p["seq_id"], rows)
        labels = unpack_rows(p["labels"], p["seq_id"], rows, fill=-100)
        lu, lp = _row_logps(model, hu, u["labels"]), _row_logps(model, hp_rows, labels)
        if attn == "sdpa":  # float64 all through: 1e-9 is ~1e5 float64 ulps of these sums, no CPU gets near
            assert torch.allclose(lp, lu, atol=1e-9, rtol=0), (lp - lu).abs().max()
        else:
            assert_same_float32_function("packed vs padded, float32 softmax", lp, lu, truth)
        assert (lu < 0).all()
        # float32 with a float32 mask: the model's own dtype, against the padded float32 forward
        m32 = model.float()
        h32 = m32.model(
            p["input_ids"], attention_mask=block_causal_mask(p["seq_id"]), position_ids=p["position_ids"]
        )
        l32 = _row_logps(m32, unpack_rows(h32.last_hidden_state, p["seq_id"], rows), labels)
        hu32 = m32.model(u["input_ids"], attention_mask=u["attention_mask"]).last_hidden_state
        assert_same_float32_function("packed float32", l32, _row_logps(m32, hu32, u["labels"]), truth, ulps=4)
        model.double()
        # changing the tokens of row 1 changes no other row's packed hidden states
        ids2 = p["input_ids"].clone()
        in_row1 = p["seq_id"] == 1
        ids2[in_row1] = (ids2[in_row1] + 17) % 512
        hp2 = packed_hidden(ids2)
        assert torch.allclose(hp2[~in_row1], hp[~in_row1], atol=1e-12, rtol=0)
        assert not torch.allclose(hp2[in_row1], hp[in_row1])
