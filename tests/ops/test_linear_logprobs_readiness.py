"""What makes `linear_logprobs` ready for a GPU, checked on CPU: autocast casts the inputs, every
Triton launch runs under the tensor's device, one host sync at most (none with validate=False),
torch.compile(fullgraph=True) traces it, the d_hidden autotune key ignores the chunk width, and the
Triton filtered backward skips whole tiles correctly (interpreter)."""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch
from helpers import cpu_backends

from fastalign.ops import linear_logprobs

llmod = importlib.import_module("fastalign.ops.linear_logprobs")
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter"
)


def case(n=12, h=16, v=700, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::3] = -100
    return hidden, weight, labels


def spy_backend(monkeypatch) -> list[dict]:
    """Record the dtype and filter_block each backend forward receives."""
    seen: list[dict] = []
    real = llmod._kernels

    def spying(name):
        fwd, bwd = real(name)

        def fwd_spy(hidden, weight, bias, *rest):
            seen.append(
                {"backend": name, "dtype": hidden.dtype, "weight_dtype": weight.dtype, "n": hidden.shape[0]}
            )
            return fwd(hidden, weight, bias, *rest)

        return fwd_spy, bwd

    monkeypatch.setattr(llmod, "_kernels", spying)
    return seen


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_autocast_runs_the_op_in_the_autocast_dtype(backend, monkeypatch):
    seen = spy_backend(monkeypatch)
    hidden, weight, labels = case()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_logprobs(h, w, labels, backend=backend)
    assert seen[-1]["dtype"] == torch.bfloat16 and seen[-1]["weight_dtype"] == torch.bfloat16
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # the cast's backward
    # Same values as the op called on bf16 inputs directly, within bf16 rounding of the result.
    want = linear_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, backend=backend)
    assert torch.allclose(logp, want, atol=1e-6)
    # Outside autocast nothing is cast.
    linear_logprobs(hidden, weight, labels, backend=backend)
    assert seen[-1]["dtype"] == torch.float32


@needs_interpreter
def test_every_triton_launch_runs_under_the_tensor_device(monkeypatch):
    """The launchers enter `_device_guard(hidden)` (torch.cuda.device(hidden.device) on a GPU)
    around every kernel launch: each kernel object is wrapped to check that it is launched inside
    the guard."""
    kmod = importlib.import_module("fastalign.kernels.linear_logprobs")
    state = {"inside": 0, "entered_with": [], "launches": []}

    @contextlib.contextmanager
    def guard(t):
        state["entered_with"].append(t.device)
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    class Checked:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                state["launches"].append((self.name, state["inside"] > 0))
                return launch(*args, **kwargs)

            return run

        def __getattr__(self, attr):  # best_config, configs, ...
            return getattr(self.kernel, attr)

    monkeypatch.setattr(kmod, "_device_guard", guard)
    for name in dir(kmod):
        if name.startswith("_linear_logprobs_") and name.endswith("_kernel"):
            monkeypatch.setattr(kmod, name, Checked(name, getattr(kmod, name)))
    hidden, weight, labels = case(v=600)
    bias = torch.randn(600)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_logprobs(*leaves[:2], labels, bias=leaves[2], grad_filter=2.0**-6, backend="triton")
    out.sum().backward()
    names = {n for n, _ in state["launches"]}
    assert {
        "_linear_logprobs_fwd_kernel",
        "_linear_logprobs_combine_kernel",
        "_linear_logprobs_bwd_kernel",
    } <= names
    assert {"_linear_logprobs_bwd_dh_kernel", "_linear_logprobs_bwd_dw_kernel"} <= names  # filtered path
    assert all(inside for _, inside in state["launches"]), state["launches"]
    assert state["entered_with"] and all(d == hidden.device for d in state["entered_with"])


def test_device_guard_selects_the_tensor_gpu(monkeypatch):
    """On a CUDA tensor the guard is torch.cuda.device(tensor.device) (mocked: no GPU here)."""
    kmod = pytest.importorskip("fastalign.kernels.linear_logprobs")
    calls = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: calls.append(dev) or contextlib.nullcontext())

    class FakeCuda:
        device = torch.device("cuda", 1)

    with kmod._device_guard(FakeCuda()):
        pass
    assert calls == [torch.device("cuda", 1)]
    with kmod._device_guard(torch.zeros(1)):  # CPU: no CUDA call
        pass
    assert calls == [torch.device("cuda", 1)]


@pytest.mark.parametrize("backend", cpu_backends())
def test_at_most_one_host_sync_and_none_without_validation(backend, monkeypatch):
    reads = []
    real_tolist = torch.Tensor.tolist
    real_item = torch.Tensor.item

    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or real_item(t))
    real_nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(
        torch.Tensor, "nonzero", lambda t, *a, **k: reads.append("nonzero") or real_nonzero(t, *a, **k)
    )
    hidden, weight, labels = case(dtype=torch.bfloat16)
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, labels, backend=backend).sum().backward()
    assert reads == ["tolist"], reads  # the label check and the valid-row count, read together
    reads.clear()
    h.grad = None
    out = linear_logprobs(h, weight, labels, backend=backend, validate=False)
    out.sum().backward()
    assert reads == [], reads
    # Ignored rows are still exactly 0 (computed and masked) and the rest equals the default path.
    want = linear_logprobs(hidden, weight, labels, backend=backend)
    assert torch.equal(out[labels == -100], torch.zeros(int((labels == -100).sum())))
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    hidden, weight, labels = case(v=900)
    bias = torch.randn(900)

    def f(h, w, b):
        logp, ent = linear_logprobs(
            h, w, labels, bias=b, return_entropy=True, temperature=0.8, backend=backend
        )
        return (logp * 2).sum() + ent.mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got = compiled(*a)
    got.backward()
    want = f(*b)
    want.backward()
    assert torch.allclose(got, want, atol=1e-5)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_torch_compile_checks_labels_on_device():
    torch._dynamo.reset()
    hidden, weight, labels = case()
    bad = labels.clone()
    bad[1] = 10_000
    f = torch.compile(
        lambda h, w, y: linear_logprobs(h, w, y, backend="torch"), fullgraph=True, backend="aot_eager"
    )
    assert torch.isfinite(f(hidden, weight, labels)).all()
    with pytest.raises(RuntimeError, match="outside"):
        f(hidden, weight, bad)


@needs_interpreter
def test_dh_autotune_key_is_the_model_shape_not_the_chunk():
    kmod = importlib.import_module("fastalign.kernels.linear_logprobs")
    for name in (
        "_linear_logprobs_bwd_dh_kernel",
        "_linear_logprobs_bwd_dw_kernel",
        "_linear_logprobs_bwd_kernel",
    ):
        keys = getattr(kmod, name).keys
        assert "C" not in keys and "H" in keys and "V" in keys, (name, keys)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_filtered_backward_skips_whole_tiles(dtype):
    """Direct launcher call with a keep mask where some blocks are dropped by every row (their
    tiles are never computed) and others by some rows: d_hidden, d_weight, d_bias equal the
    float64 gradient with dz zeroed on exactly those (row, block) pairs; an odd vocabulary pads
    the last chunk."""
    kmod = importlib.import_module("fastalign.kernels.linear_logprobs")
    n, h, v, fb = 40, 24, 1001, llmod.FILTER_BLOCK
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype)
    bias = torch.randn(v, generator=gen).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels = torch.where(labels // fb == 1, labels + fb, labels)  # no label in block 1
    nb = -(-v // fb)
    keep = (torch.rand(n, nb, generator=gen) < 0.5).to(torch.uint8)
    keep[:, 1] = 0  # a block every row drops: all its tiles are skipped
    keep[:, 3] = 1
    keep[torch.arange(n), labels // fb] = 1
    g = torch.randn(n, generator=gen)
    _, lse, _, _ = kmod.linear_logprobs_forward(hidden, weight, bias, labels, -100, 1.0, False, 0)
    d_h, d_w, d_b = kmod.linear_logprobs_backward(
        hidden, weight, bias, labels, lse, None, g, None, -100, 1.0, 512, True, True, True, keep, fb
    )
    z = hidden.double() @ weight.double().T + bias.double()
    dz = -g.double()[:, None] * torch.softmax(z, 1)
    dz[torch.arange(n), labels] += g.double()
    dz = dz.masked_fill((keep == 0).repeat_interleave(fb, 1)[:, :v], 0.0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in ((d_h, dz @ weight.double()), (d_w, dz.T @ hidden.double()), (d_b, dz.sum(0))):
        scale = max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol * scale
    assert (d_w[fb : 2 * fb] == 0).all() and (d_b[fb : 2 * fb] == 0).all()


def test_validate_false_rejects_nothing_but_default_still_checks():
    hidden, weight, labels = case()
    bad = labels.clone()
    bad[0] = 700
    with pytest.raises(ValueError, match=r"outside \[0, 700\)"):
        linear_logprobs(hidden, weight, bad, backend="torch")
    out = linear_logprobs(hidden, weight, bad, backend="torch", validate=False)  # memory-safe
    assert out.shape == labels.shape


def test_module_passes_grad_filter_and_validate():
    from fastalign.ops import LinearLogprobs

    hidden, weight, labels = case(dtype=torch.bfloat16)
    mod = LinearLogprobs(grad_filter=None, validate=False, backend="torch")
    assert "grad_filter=None" in repr(mod)
    got = mod(hidden, weight, labels)
    want = linear_logprobs(hidden, weight, labels, grad_filter=None, validate=False, backend="torch")
    assert torch.equal(got, want)
    h = hidden.clone().requires_grad_()
    with llmod.grad_filter_stats() as stats:
        LinearLogprobs(grad_filter=2.0**-4, backend="torch")(h, weight, labels).sum().backward()
    assert [r["budget"] for r in stats] == [2.0**-4]
