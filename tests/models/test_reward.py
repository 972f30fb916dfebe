"""load_reward_model (decoder and encoder backbones) and ValueHeadModel: pooling under padding,
LoRA, save/load round trips through plain transformers.

Two float32 computations of one function (padded vs alone, export vs live) are compared through a
float64 copy of the model with the numerics rule (tests/helpers.py), not a fixed atol: how far two
float32 roundings of the same function fall apart depends on the CPU's kernels. Rewards are two
numbers, whose largest float32 error is a noisy sample, so the comparisons also take the head's
score at every real token (the rewards pool one per row) and, for merged LoRA, a batch of random ids.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import assert_same_float32_function, assert_within_float32_error, float64_truth, max_err
from repo_assets import ASSETS

from fastalign.models import ValueHeadModel, load_reward_model, load_tokenizer, save_pretrained

MODEL = ASSETS / "models" / "stories260k"
needs_model = pytest.mark.skipif(not MODEL.exists(), reason=f"needs the stories260k model at {MODEL}")
TEXTS = ["Once upon a time there was a little cat who liked milk.", "The dog ran."]


def _rewards(rm, enc):
    return rm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]  # (B,)


def _scored(rm, ids, mask=None):
    """(rewards (B,), the score head's output at every real token, flat): what the rewards pool."""
    (head,) = [m for n, m in rm.named_modules() if n.split(".")[-1] == "score"]  # peft: its wrapper
    seen = []
    hook = head.register_forward_hook(lambda _m, _args, out: seen.append(out[..., 0]))  # (B, T)
    try:
        rewards = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    finally:
        hook.remove()
    return rewards, seen[0][torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()]


def _outputs(rm, batches):
    """Rewards then per-token scores of each (ids, mask) batch, as one flat tensor."""
    return torch.cat([t for ids, mask in batches for t in _scored(rm, ids, mask)])


def _each_alone(rm, rows):
    """_outputs of the padded batch of `rows`, computed from each row alone (no padding)."""
    parts = [_scored(rm, ids) for ids in rows]
    return torch.cat([r for r, _ in parts] + [s for _, s in parts])


def _merged_reference(model, outputs):
    """(truth, plain float32 error) for a merged LoRA export of `model`. Truth: `outputs` of the live
    adapter (W + s·BA, unmerged) in float64. Plain error: the larger of two plain float32 versions
    of that function, the live adapter and its float64 merge rounded to float32 once (what an export
    stores). The export rounds W + s·BA, which the live model never does, and on a few dozen values
    either error alone is a noisy maximum: against the live one, exports came out up to ~3x."""
    live64 = float64_truth(model)
    truth = outputs(live64)
    if hasattr(live64, "backbone"):  # ValueHeadModel: a peft backbone and a plain head
        live64.backbone = live64.backbone.merge_and_unload()
        merged64 = live64
    else:
        merged64 = live64.merge_and_unload()
    # the merge itself is exact in float64 (~1e-14 here): 1e-9 on any CPU, a wrong merge is far off
    assert (outputs(merged64) - truth).abs().max() < 1e-9
    return truth, max(max_err(outputs(model), truth), max_err(outputs(merged64.float()), truth))


def test_fresh_head_padding_invariant_and_round_trip(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(str(MODEL))
    rm = load_reward_model(str(MODEL), dtype="float32")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][1] == 0).any()
    padded = [(enc["input_ids"], enc["attention_mask"])]
    rows = [tok([t], return_tensors="pt")["input_ids"] for t in TEXTS]
    rm64 = float64_truth(rm)
    with torch.no_grad():
        batched = _rewards(rm, enc)
        alone, alone64 = _each_alone(rm, rows), _each_alone(rm64, rows)
        assert_same_float32_function("padded batch vs each text alone", _outputs(rm, padded), alone, alone64)
    assert batched.shape == (2,)

    out = save_pretrained(rm, tok, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        live, truth = _outputs(rm, padded), _outputs(rm64, padded)
        assert_same_float32_function("export vs live", _outputs(plain, padded), live, truth)
    again = load_reward_model(str(out), dtype="float32")  # a saved reward model loads back as is
    assert torch.equal(again.score.weight, rm.score.weight)


def test_reward_lora_trains_head_and_merges(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(str(MODEL))
    lora = {"r": 2, "alpha": 4}
    rm = load_reward_model(str(MODEL), dtype="float32", lora=lora, gradient_checkpointing=True)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    rm.train()
    opt = torch.optim.SGD([p for p in rm.parameters() if p.requires_grad], lr=0.5)
    r = _rewards(rm, enc)
    (-torch.nn.functional.logsigmoid(r[0] - r[1])).backward()
    opt.step()
    rm.eval()
    batches = [(enc["input_ids"], enc["attention_mask"]), (torch.randint(3, 512, (8, 32)), None)]
    with torch.no_grad():
        truth, plain_err = _merged_reference(rm, lambda m: _outputs(m, batches))
    plain = AutoModelForSequenceClassification.from_pretrained(save_pretrained(rm, tok, tmp_path / "rm"))
    with torch.no_grad():
        assert_within_float32_error("merged export", _outputs(plain, batches), truth, plain_err)


def test_encoder_backbone(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(cfg).save_pretrained(tmp_path / "bert")  # no tokenizer: pad id comes from the config
    rm = load_reward_model(str(tmp_path / "bert"), dtype="float32")
    assert type(rm).__name__ == "BertForSequenceClassification" and rm.config.pad_token_id == 0
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 6, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        batched = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = rm(input_ids=ids[1:, :3]).logits[:, 0]
        truth = float64_truth(rm)(input_ids=ids[1:, :3]).logits[:, 0]
    # rewards of this random-init model are ~4e-3 and differ by ~1e-5 between inputs: an atol of 1e-5
    # let an ignored attention mask pass; the rule's two ulps of max(1, |reward|) do not
    assert_same_float32_function("encoder: padded row vs alone", batched[1:], alone, truth)
    vm = ValueHeadModel.from_pretrained(str(tmp_path / "bert"), dtype="float32")
    assert vm(ids, mask).shape == (2, 5)


def test_value_head_round_trip(tmp_path):
    tok = load_tokenizer(str(MODEL))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    vm = ValueHeadModel.from_pretrained(
        str(MODEL), dtype="float32", lora={"r": 2}, gradient_checkpointing=True
    )
    trainable = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("value_head") for n in trainable)
    vm.train()
    values = vm(enc["input_ids"], enc["attention_mask"])
    assert values.shape == enc["input_ids"].shape
    values.square().mean().backward()
    torch.optim.SGD([p for p in vm.parameters() if p.requires_grad], lr=0.5).step()
    vm.eval()
    with torch.no_grad():
        truth, plain_err = _merged_reference(vm, lambda m: m(enc["input_ids"], enc["attention_mask"]))
    out = vm.save_pretrained(tmp_path / "critic", tok)
    assert (out / "value_head.safetensors").is_file() and (out / "model.safetensors").is_file()
    back = ValueHeadModel.from_pretrained(str(out), dtype="float32")
    with torch.no_grad():
        reloaded = back(enc["input_ids"], enc["attention_mask"])
    assert_within_float32_error("reloaded critic", reloaded, truth, plain_err)
    # each row alone gives the values of its padded copy, where the mask is 1
    rows = [tok([t], return_tensors="pt")["input_ids"] for t in TEXTS]
    back64 = float64_truth(back)
    with torch.no_grad():
        alone, alone64 = (torch.cat([m(ids)[0] for ids in rows]) for m in (back, back64))
    real = enc["attention_mask"].bool()
    assert_same_float32_function("critic: padded batch vs each row alone", reloaded[real], alone, alone64)
