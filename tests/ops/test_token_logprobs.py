import math

import pytest
import torch
from helpers import assert_within_rule, cpu_backends
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.ops import token_logprobs, token_logprobs_reference

LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_case(shape, dtype, ignore_frac=0.25, scale=3.0, device="cpu", ignore_index=-100):
    *batch, v = shape
    logits = (torch.randn(shape, device=device) * scale).to(dtype)
    labels = torch.randint(0, v, tuple(batch), device=device)
    labels[torch.rand(tuple(batch), device=device) < ignore_frac] = ignore_index
    return logits, labels


def run(fn, logits, labels, g_logp, g_ent, **kw):
    """Values and logits-gradient of sum(logp * g_logp) [+ sum(entropy * g_ent)]."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, labels, **kw)
    logp, ent = out if kw.get("return_entropy") else (out, None)
    loss = (logp * g_logp).sum() + (0 if ent is None else (ent * g_ent).sum())
    loss.backward()
    return logp.detach(), (None if ent is None else ent.detach()), x.grad


def check_against_float64(
    backend, shape, dtype, temperature=1.0, return_entropy=True, ignore_index=-100, scale=3.0, atol=None
):
    logits, labels = make_case(shape, dtype, ignore_index=ignore_index, scale=scale)
    g_logp, g_ent = torch.randn(shape[:-1]), torch.randn(shape[:-1])
    kw = dict(temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index)
    fused = run(token_logprobs, logits, labels, g_logp, g_ent, backend=backend, **kw)
    plain = run(token_logprobs_reference, logits, labels, g_logp, g_ent, **kw)
    truth = run(token_logprobs_reference, logits.double(), labels, g_logp.double(), g_ent.double(), **kw)
    assert fused[0].dtype == torch.float32 and fused[2].dtype == dtype
    for name, f, p, t in zip(("logp", "entropy", "grad"), fused, plain, truth, strict=True):
        if t is not None:
            assert_within_rule(f"{backend}/{name}", f, p, t, dtype, atol)
    ignored = labels == ignore_index
    assert (fused[0][ignored] == 0).all() and (fused[2][ignored] == 0).all()
    assert (fused[0] <= 0).all()
    return fused


SHAPES = [(1, 1), (1, 7), (7, 1000), (3, 5, 129), (16, 2051)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_float64(backend, shape, temperature):
    check_against_float64(backend, shape, torch.float32, temperature)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(7, 1000), (2, 3, 4099)], ids=str)
def test_low_precision_matches_float64(backend, dtype, shape):
    check_against_float64(backend, shape, dtype, temperature=1.3)


@pytest.mark.parametrize("backend", cpu_backends())
def test_without_entropy_and_custom_ignore_index(backend):
    # ignore_index inside the vocabulary: rows labelled 0 are ignored, not scored.
    fused = check_against_float64(backend, (9, 300), torch.float32, return_entropy=False, ignore_index=0)
    assert fused[1] is None


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("scale", [30.0, 300.0])
def test_large_logits_keep_eager_precision(backend, scale):
    # |lse| in the hundreds: the backward must not lose precision to a rounded log-sum-exp
    # (the forward saves it in float64), so the bound is 2x eager's error with a tiny atol.
    check_against_float64(backend, (6, 3001), torch.float32, temperature=0.7, scale=scale, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_llama4_sized_vocab(backend):
    check_against_float64(backend, (3, 262_144), torch.float32, temperature=0.9)


@pytest.mark.parametrize("backend", cpu_backends())
def test_all_ignored_rows_give_zero_values_and_grads(backend):
    logits = torch.randn(4, 65, requires_grad=True)
    labels = torch.full((4,), -100)
    logp, ent = token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(ent, torch.zeros(4))
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", cpu_backends())
def test_entropy_of_uniform_and_one_hot(backend):
    v = 50
    logits = torch.zeros(2, v)
    logits[1, 3] = 1e4  # one-hot: logp(label 3) must be exactly 0, entropy 0
    logp, ent = token_logprobs(logits, torch.tensor([7, 3]), return_entropy=True, backend=backend)
    assert logp[0].item() == pytest.approx(-math.log(v), abs=1e-5)
    assert ent[0].item() == pytest.approx(math.log(v), abs=1e-5)
    assert logp[1].item() == 0.0 and ent[1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_float64(backend):
    logits = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100], [10, 0], [5, 5]])
    for t in (1.0, 0.6):
        fn = lambda x, t=t: token_logprobs(x, labels, temperature=t, return_entropy=True, backend=backend)
        assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bad", [-1, 33, 10**6])
def test_out_of_range_labels_raise(backend, bad):
    labels = torch.tensor([0, bad, 2])
    with pytest.raises(ValueError, match=r"outside \[0, 33\)"):
        token_logprobs(torch.randn(3, 33), labels, backend=backend)


def test_bad_arguments_give_clear_errors():
    x, y = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels shape"):
        token_logprobs(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(x, y, backend="cuda")
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(x, y.float())
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(x.long(), y)


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_vocab_sized_tensor_is_saved_for_backward(backend):
    n, v = 8, 512
    logits = torch.randn(n, v, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, torch.randint(0, v, (n,)), return_entropy=True, backend=backend)
    # Only the caller's logits and per-row tensors are kept: no log_softmax / probabilities.
    extra = [t.numel() for t in saved if t.data_ptr() != logits.data_ptr()]
    assert extra and max(extra) <= n, extra


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_non_contiguous_int32_labels_and_no_grad(backend):
    base = torch.randn(6, 40, 3)
    logits = base[..., 1]  # (6, 40), stride 3 on the vocab dim
    labels = torch.randint(0, 40, (6,), dtype=torch.int32)
    with torch.no_grad():
        got = token_logprobs(logits, labels, backend=backend)
    want = token_logprobs_reference(logits.double(), labels.long())
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_auto_picks_cpp_on_cpu():
    from fastalign.ops._backend import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), "token_logprobs") == "cpp"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 300),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 3e3]),
    temperature=st.sampled_from([0.25, 1.0, 4.0]),
    backend=st.sampled_from(["torch", "cpp"]),
)
def test_logp_nonpositive_entropy_in_range(n, v, scale, temperature, backend):
    logits = torch.randn(n, v) * scale
    logits[0, 0] = logits.max() + scale  # a clear winner and possible ties elsewhere
    labels = torch.randint(0, v, (n,))
    labels[0] = 0
    logp, ent = token_logprobs(logits, labels, temperature=temperature, return_entropy=True, backend=backend)
    assert (logp <= 0).all()
    assert (ent >= 0).all() and (ent <= math.log(v) + 1e-4).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(4096, 49152), (512, 128256), (3, 7, 1001)], ids=str)
def test_triton_gpu_matches_float64(dtype, shape):
    logits, labels = make_case(shape, dtype, device="cuda")
    g_logp, g_ent = torch.randn(shape[:-1], device="cuda"), torch.randn(shape[:-1], device="cuda")
    kw = dict(temperature=0.8, return_entropy=True)
    fused = run(token_logprobs, logits, labels, g_logp, g_ent, backend="triton", **kw)
    plain = run(token_logprobs_reference, logits, labels, g_logp, g_ent, **kw)
    truth = run(token_logprobs_reference, logits.double(), labels, g_logp.double(), g_ent.double(), **kw)
    for name, f, p, t in zip(("logp", "entropy", "grad"), fused, plain, truth, strict=True):
        assert_within_rule(f"triton/{name}", f, p, t, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_vocabulary_with_minus_inf_logits(backend):
    logits = torch.randn(3, 40)
    logits[:, 10:25] = float("-inf")  # e.g. tokens banned by a constrained decoder
    labels = torch.tensor([0, 30, -100])
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    want_logp, want_ent = token_logprobs_reference(logits.double(), labels, return_entropy=True)
    assert torch.isfinite(x.grad).all() and (x.grad[:, 10:25] == 0).all()
    assert torch.allclose(logp.double(), want_logp, atol=1e-5)
    assert torch.allclose(ent.double(), want_ent, atol=1e-5)


def test_module_matches_function():
    from fastalign.ops import TokenLogprobs

    logits, labels = make_case((4, 9, 50), torch.float32)
    mod = TokenLogprobs(temperature=0.5, return_entropy=True, backend="torch")
    got = mod(logits, labels)
    want = token_logprobs(logits, labels, temperature=0.5, return_entropy=True, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert "temperature=0.5" in repr(mod)


def test_labels_as_a_python_list_is_a_type_error():
    logits = torch.randn(3, 10)
    with pytest.raises(TypeError, match=r"token_logprobs: labels must be a torch\.Tensor, got list"):
        token_logprobs(logits, [1, 2, 3])
