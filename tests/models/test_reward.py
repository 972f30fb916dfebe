"""load_reward_model (decoder and encoder backbones) and ValueHeadModel: pooling under padding,
LoRA, save/load round trips through plain transformers."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from repo_assets import ASSETS

from fastalign.models import ValueHeadModel, load_reward_model, load_tokenizer, save_pretrained

MODEL = ASSETS / "models" / "stories260k"
needs_model = pytest.mark.skipif(not MODEL.exists(), reason=f"needs the stories260k model at {MODEL}")
TEXTS = ["Once upon a time there was a little cat who liked milk.", "The dog ran."]


def _rewards(rm, enc):
    return rm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]  # (B,)


def test_fresh_head_padding_invariant_and_round_trip(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(str(MODEL))
    rm = load_reward_model(str(MODEL), dtype="float32")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][1] == 0).any()
    with torch.no_grad():
        batched = _rewards(rm, enc)
        alone = torch.stack([_rewards(rm, tok([t], return_tensors="pt"))[0] for t in TEXTS])
    assert batched.shape == (2,)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)

    out = save_pretrained(rm, tok, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(_rewards(plain, enc), batched, atol=1e-6, rtol=0)
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
    with torch.no_grad():
        trained = _rewards(rm, enc)
    plain = AutoModelForSequenceClassification.from_pretrained(save_pretrained(rm, tok, tmp_path / "rm"))
    with torch.no_grad():
        torch.testing.assert_close(_rewards(plain, enc), trained, atol=1e-5, rtol=1e-5)


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
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)
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
        trained = vm(enc["input_ids"], enc["attention_mask"])
    out = vm.save_pretrained(tmp_path / "critic", tok)
    assert (out / "value_head.safetensors").is_file() and (out / "model.safetensors").is_file()
    back = ValueHeadModel.from_pretrained(str(out), dtype="float32")
    with torch.no_grad():
        reloaded = back(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    # an unpadded row gives the same values as its padded copy, where the mask is 1
    with torch.no_grad():
        short = back(tok([TEXTS[1]], return_tensors="pt")["input_ids"])[0]
    n = short.shape[0]
    torch.testing.assert_close(trained[1, :n], short, atol=1e-5, rtol=1e-5)
