import pytest
import torch
from helpers import assert_within_rule, cpu_backends

from fastalign.ops import linear_logprobs, linear_logprobs_reference, token_logprobs


def make_case(n_shape, h, v, dtype, bias=True, device="cpu", ignore_frac=0.25, scale=2.0):
    hidden = torch.randn((*n_shape, h), device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) / h**0.5 * scale).to(dtype)
    b = (torch.randn(v, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, n_shape, device=device)
    labels[torch.rand(n_shape, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, g_logp, g_ent, **kw):
    """Values and gradients (hidden, weight, bias) of sum(logp * g_logp) + sum(entropy * g_ent)."""
    leaves = [
        t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)
    ]
    out = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    logp, ent = out if kw.get("return_entropy") else (out, None)
    loss = (logp * g_logp).sum() + (0 if ent is None else (ent * g_ent).sum())
    loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return [logp.detach(), None if ent is None else ent.detach(), *grads]


NAMES = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")


def check_against_float64(
    backend,
    n_shape,
    h,
    v,
    dtype,
    bias=True,
    temperature=1.0,
    return_entropy=True,
    chunk=None,
    scale=2.0,
    atol=None,
):
    hidden, weight, b, labels = make_case(n_shape, h, v, dtype, bias, scale=scale)
    g_logp, g_ent = torch.randn(n_shape), torch.randn(n_shape)
    kw = dict(temperature=temperature, return_entropy=return_entropy)
    fused = run(
        linear_logprobs, hidden, weight, b, labels, g_logp, g_ent, backend=backend, chunk_size=chunk, **kw
    )
    plain = run(linear_logprobs_reference, hidden, weight, b, labels, g_logp, g_ent, **kw)
    b64 = b.double() if b is not None else None
    truth = run(
        linear_logprobs_reference,
        hidden.double(),
        weight.double(),
        b64,
        labels,
        g_logp.double(),
        g_ent.double(),
        **kw,
    )
    for name, f, p, t in zip(NAMES, fused, plain, truth, strict=True):
        if t is not None:
            assert f.dtype == (torch.float32 if name in ("logp", "entropy") else dtype), name
            assert_within_rule(f"{backend}/{name}", f, p, t, dtype, atol)
    ignored = labels == -100
    assert (fused[0][ignored] == 0).all() and (fused[0] <= 0).all()
    return fused


CASES = [  # (row shape, H, V, chunk)
    ((1,), 8, 1, None),
    ((1,), 16, 7, None),
    ((13,), 32, 300, 64),  # V not a multiple of the chunk
    ((3, 5), 24, 257, 100),  # 3-D input
    ((33,), 40, 1000, None),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_float64(backend, case, temperature):
    n_shape, h, v, chunk = case
    check_against_float64(backend, n_shape, h, v, torch.float32, temperature=temperature, chunk=chunk)


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_bias_no_entropy(backend):
    fused = check_against_float64(
        backend, (17,), 32, 130, torch.float32, bias=False, return_entropy=False, chunk=64
    )
    assert fused[1] is None and fused[4] is None


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_float64(backend, dtype):
    check_against_float64(backend, (2, 20), 64, 1500, dtype, temperature=1.2, chunk=512)


@pytest.mark.parametrize("backend", cpu_backends())
def test_large_logits_keep_eager_precision(backend):
    # Logits ~ +-100: the float64 log-sum-exp keeps the backward at eager's precision (the atol
    # is 20x below the default; the online entropy over several tiles needs ~1e-6).
    check_against_float64(
        backend, (9,), 32, 700, torch.float32, temperature=0.7, chunk=256, scale=100.0, atol=1e-6
    )


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_llama4_sized_vocab(backend):
    check_against_float64(backend, (3,), 16, 262_144, torch.float32, bias=False)


@pytest.mark.parametrize("backend", cpu_backends())
def test_equals_token_logprobs_on_materialised_logits(backend):
    hidden, weight, b, labels = make_case((10,), 32, 200, torch.float32)
    got = linear_logprobs(hidden, weight, labels, bias=b, temperature=0.5, backend=backend, chunk_size=48)
    want = token_logprobs(hidden @ weight.T + b, labels, temperature=0.5, backend="torch")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_float64(backend):
    hidden, weight, b, labels = make_case((5,), 6, 13, torch.float64)
    labels[0] = -100
    fn = lambda h, w, b: linear_logprobs(
        h, w, labels, bias=b, temperature=0.8, return_entropy=True, chunk_size=4, backend=backend
    )
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (hidden, weight, b)))


@pytest.mark.parametrize("backend", cpu_backends())
def test_frozen_weight_gets_no_grad_and_all_ignored_rows_are_zero(backend):
    hidden = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(50, 16)  # frozen lm_head (e.g. reference model)
    labels = torch.tensor([-100, -100, -100, -100])
    logp, ent = linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(ent, torch.zeros(4))
    (logp.sum() + ent.sum()).backward()
    assert weight.grad is None and torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_logits_sized_tensor_is_saved_for_backward(backend):
    n, h, v = 16, 8, 640
    hidden, weight = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_logprobs(hidden, weight, torch.randint(0, v, (n,)), return_entropy=True, backend=backend)
    inputs = {hidden.data_ptr(), weight.data_ptr()}
    extra = [t.numel() for t in saved if t.data_ptr() not in inputs]
    assert extra and max(extra) <= n, extra  # labels and per-row statistics only


@pytest.mark.parametrize("backend", cpu_backends())
def test_out_of_range_labels_raise(backend):
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        linear_logprobs(torch.randn(3, 4), torch.randn(20, 4), torch.tensor([0, 20, -100]), backend=backend)


def test_bad_arguments_give_clear_errors():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be \(V, H\)"):
        linear_logprobs(h, torch.randn(10, 9), y)
    with pytest.raises(ValueError, match="share dtype"):
        linear_logprobs(h, w.double(), y)
    with pytest.raises(ValueError, match="bias must be"):
        linear_logprobs(h, w, y, bias=torch.randn(11))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_logprobs(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="labels shape"):
        linear_logprobs(h, w, y[:3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [((4096,), 576, 49152), ((2, 300), 2048, 128256), ((5,), 64, 1001)], ids=str)
def test_triton_gpu_matches_float64(dtype, case):
    n_shape, h, v = case
    hidden, weight, b, labels = make_case(n_shape, h, v, dtype, device="cuda")
    g_logp, g_ent = torch.randn(n_shape, device="cuda"), torch.randn(n_shape, device="cuda")
    kw = dict(temperature=0.9, return_entropy=True)
    fused = run(linear_logprobs, hidden, weight, b, labels, g_logp, g_ent, backend="triton", **kw)
    plain = run(linear_logprobs_reference, hidden, weight, b, labels, g_logp, g_ent, **kw)
    truth = run(
        linear_logprobs_reference,
        hidden.double(),
        weight.double(),
        b.double(),
        labels,
        g_logp.double(),
        g_ent.double(),
        **kw,
    )
    for name, f, p, t in zip(NAMES, fused, plain, truth, strict=True):
        assert_within_rule(f"triton/{name}", f, p, t, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_minus_inf_bias_masks_tokens(backend):
    hidden, weight = torch.randn(5, 8), torch.randn(70, 8)
    bias = torch.zeros(70)
    bias[:40] = float("-inf")  # a whole leading tile masked
    labels = torch.tensor([50, 69, 45, -100, 41])
    h = hidden.clone().requires_grad_(True)
    logp, ent = linear_logprobs(
        h, weight, labels, bias=bias, return_entropy=True, chunk_size=32, backend=backend
    )
    (logp.sum() + ent.sum()).backward()
    z = (hidden @ weight.T).double()[:, 40:]
    want = token_logprobs(
        z, torch.where(labels >= 0, labels - 40, -100), return_entropy=True, backend="torch"
    )
    assert torch.allclose(logp.double(), want[0], atol=1e-5)
    assert torch.allclose(ent.double(), want[1], atol=1e-5)
    assert torch.isfinite(h.grad).all()


def test_module_matches_function():
    from fastalign.ops import LinearLogprobs

    hidden, weight, b, labels = make_case((6,), 16, 90, torch.float32)
    mod = LinearLogprobs(temperature=2.0, chunk_size=32, backend="torch")
    assert list(mod.parameters()) == []  # the model keeps owning its lm_head
    got = mod(hidden, weight, labels, bias=b)
    want = linear_logprobs(hidden, weight, labels, bias=b, temperature=2.0, chunk_size=32, backend="torch")
    assert torch.equal(got, want)


def test_labels_or_bias_as_python_lists_are_type_errors():
    h, w = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match=r"linear_logprobs: labels must be a torch\.Tensor, got list"):
        linear_logprobs(h, w, [1, 2, 3])
    with pytest.raises(TypeError, match=r"linear_logprobs: bias must be a torch\.Tensor, got list"):
        linear_logprobs(h, w, torch.tensor([1, 2, 3]), bias=[0.0] * 10)
