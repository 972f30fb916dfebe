"""Padding-free batches on CPU (`engine/forward._padding_free_hidden`, `models/causal_lm._sdpa_varlen`):
a right-padded batch runs the decoder on its real tokens only, packed into one sequence with
causal attention inside each row. At every real position it gives the padded forward's hidden
states and gradients (two float32 computations of one function: each held to the numerics rule
against a float64 copy), for grouped-query and sliding-window attention too; attention it cannot
keep inside rows falls back to the padded batch."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import assert_same_float32_function, float64_truth
from repo_assets import ASSETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _batch(vocab: int, lens: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = max(lens)
    ids = torch.randint(3, vocab, (len(lens), t), generator=g)
    mask = (torch.arange(t)[None, :] < torch.tensor(lens)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}  # (R, T), right-padded


def _stories():
    from fastalign.models import load_causal_lm

    return load_causal_lm(str(ASSETS / "models" / "stories260k"), dtype="float32").eval()


def _tiny(arch: str, **extra):
    """A random-init model of `arch` on 'sdpa' with the padding-free attention registered."""
    import transformers

    from fastalign.models.causal_lm import _register_varlen_sdpa

    _register_varlen_sdpa()
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()


def _both(model, batch):
    """(padding-free (R, T-1, H), padded (R, T-1, H), how many attention calls went padding-free)."""
    from fastalign.engine.forward import shifted_hidden_states
    from fastalign.models import decoder_hidden_states
    from fastalign.models.causal_lm import _varlen_calls

    before = _varlen_calls[0]
    free = shifted_hidden_states(model, batch)
    calls = _varlen_calls[0] - before
    padded = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    return free, padded, calls


def _real(batch) -> torch.Tensor:
    return batch["attention_mask"][:, :-1].bool()  # positions that predict a label


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_stories, id="stories260k"),
        pytest.param(lambda: _tiny("Llama"), id="llama-gqa"),
        pytest.param(lambda: _tiny("Mistral", sliding_window=5), id="mistral-sliding-window"),
        pytest.param(
            lambda: _tiny("Qwen2", sliding_window=5, use_sliding_window=True, max_window_layers=0),
            id="qwen2-sliding-window",
        ),
    ],
)
def test_padding_free_equals_padded_at_every_real_position(make):
    model = make()
    batch = _batch(model.config.vocab_size, [13, 4, 9, 1, 13])
    truth_model = (
        float64_truth(model) if type(model).__name__ == "LlamaForCausalLM" else copy.deepcopy(model).double()
    )
    with torch.no_grad():
        free, padded, calls = _both(model, batch)
        _, truth, _ = _both(truth_model, batch)
    assert calls == model.config.num_hidden_layers  # one packed attention call per layer
    real = _real(batch)
    assert (free[~real] == 0).all()  # padding positions are zeros the loss never reads
    assert_same_float32_function("padding-free vs padded", free[real], padded[real], truth[real])


def test_gradients_equal_the_padded_forward():
    from fastalign.models import decoder_hidden_states

    model = _stories()
    batch = _batch(model.config.vocab_size, [11, 3, 8])
    real = _real(batch)
    w = torch.randn(real.sum(), model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def grads(forward) -> torch.Tensor:
        model.zero_grad()
        (forward()[real] * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    from fastalign.engine.forward import shifted_hidden_states

    free = grads(lambda: shifted_hidden_states(model, batch))
    padded = grads(lambda: decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1])
    truth_model = float64_truth(model)
    truth_model.zero_grad()
    h = decoder_hidden_states(truth_model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    (h[real] * w.double()).sum().backward()
    truth = torch.cat([p.grad.flatten() for p in truth_model.parameters() if p.grad is not None])
    assert_same_float32_function("padding-free gradients", free, padded, truth)


def test_eager_attention_and_unpadded_batches_run_as_before():
    from fastalign.engine.forward import _padding_free_hidden
    from fastalign.models import load_causal_lm

    path = str(ASSETS / "models" / "stories260k")
    eager = load_causal_lm(path, dtype="float32", attn_implementation="eager")
    assert _padding_free_hidden(eager, _batch(512, [5, 3])) is None  # eager: padded batch
    full = _batch(512, [6, 6])
    assert _padding_free_hidden(_stories(), full) is None  # no padding: nothing to remove


def test_attention_sinks_fall_back_to_the_padded_batch():
    from fastalign.engine.forward import shifted_hidden_states
    from fastalign.models import decoder_hidden_states
    from fastalign.models.causal_lm import PaddingFreeUnsupported, _sdpa_varlen, supports_seq_lens

    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(PaddingFreeUnsupported, match="sinks"):
        _sdpa_varlen(torch.nn.Module(), q, q, q, None, fastalign_seq_lens=(3, 2), s_aux=torch.zeros(2))

    # a model whose layers drop the keyword: caught, marked, and the batch runs padded
    model = _stories()
    for layer in model.model.layers:
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, fastalign_seq_lens=None, **k: _f(*a, **k)
    batch = _batch(model.config.vocab_size, [7, 4])
    with torch.no_grad():
        h = shifted_hidden_states(model, batch)
        padded = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    assert not supports_seq_lens(model)
    assert torch.equal(h, padded)
