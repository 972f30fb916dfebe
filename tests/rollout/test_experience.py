"""Experience assembly: rollout-time log-probs = train-time recomputation, the fused path against a
float64 full-logits reference, padding / masks, scores, KL, and advantage whitening over ranks."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from helpers import assert_within_float32_error, float64_truth, max_err
from repo_assets import ASSETS

MODEL = ASSETS / "models" / "stories260k"

PROMPTS = ["Once upon a time", "Tom had a big red ball", "The cat"]


@pytest.fixture(scope="module")
def lm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from fastalign.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(MODEL))
    model = load_causal_lm(str(MODEL), dtype="float32")
    model.eval()
    return tok, model


def _generate(lm, temperature=0.7, top_k=20):
    from fastalign.config import GenerationConfig
    from fastalign.rollout.generate import generate

    tok, model = lm
    gen = GenerationConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, batch_size=8)
    ids = [tok(p).input_ids for p in PROMPTS]
    return gen, generate(model, tok, ids, gen, seed=3, return_logprobs=True)


def _full_logps(model, batch, temperature):
    """(B, T-1, V) log_softmax(logits / T) of the full logits in the model's dtype: the plain
    computation (float32 model) or its truth (float64 copy)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.log_softmax(logits / temperature, -1)


def test_pad_batch_layout():
    from fastalign.rollout.experience import pad_batch, shifted

    b = pad_batch([[1, 5], [1, 6, 7]], [[8, 9, 2], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 8, 9, 2], [1, 6, 7, 4, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, 8, 9, 2], [-100, -100, -100, 4, -100]]
    # shifted frame: position t predicts token t+1
    assert (shifted(b) != -100).tolist() == [[False, True, True, True], [False, False, True, False]]


def test_rollout_logprobs_equal_train_time_recomputation(lm):
    """The sampler's log_softmax(logits / T) (left-padded, incremental decoding, top-k on) equals the
    fused train-time recomputation on the right-padded batch for the same tokens and weights."""
    from fastalign.rollout.experience import pad_batch, shifted, token_logps

    tok, model = lm
    gen, g = _generate(lm)
    assert len({len(r) for r in g.response_ids}) >= 1 and all(g.logprobs)
    batch = pad_batch(g.prompt_ids, g.response_ids, tok.pad_token_id)
    with torch.no_grad():
        logps = token_logps(model, batch, gen.temperature)  # (B, T-1)
    rollout = torch.zeros_like(logps)
    for i, (p, r) in enumerate(zip(g.prompt_ids, g.response_ids, strict=True)):
        rollout[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(g.logprobs[i])
        assert logps[i, : len(p) - 1].abs().max() == 0 and logps[i, len(p) - 1 + len(r) :].abs().sum() == 0
    # two float32 computations of the same log-probs, each held to twice the plain float32 error
    # against the float64 model (not an atol between the two). That error is measured over the
    # top_k candidates at each response position, not only the sampled token: a steadier maximum.
    labels = shifted(batch)
    on = labels != -100
    lp64, lp32 = (_full_logps(m, batch, gen.temperature)[on] for m in (float64_truth(model), model))  # (N, V)
    top = lp64.topk(gen.top_k, dim=-1).indices
    plain_err = max_err(lp32.gather(-1, top), lp64.gather(-1, top))
    truth = lp64.gather(-1, labels[on][:, None])[:, 0]
    assert_within_float32_error("rollout log-probs", rollout[on], truth, plain_err)
    assert_within_float32_error("train-time recomputation", logps[on], truth, plain_err)
    # temperature matters: at T = 1 the same tokens get different log-probs
    with torch.no_grad():
        other = token_logps(model, batch, 1.0)
    assert (other - logps).abs().max() > 1e-2


def test_fused_logprobs_against_float64_full_logits(lm):
    """Error of the fused fp32 path vs float64 ≤ 2× that of plain fp32 full logits + 1e-6."""
    from fastalign.rollout.experience import pad_batch, shifted, token_logps

    tok, model = lm
    gen, g = _generate(lm)
    batch = pad_batch(g.prompt_ids, g.response_ids, tok.pad_token_id)
    labels = shifted(batch)
    mask = labels != -100

    def full(m, dtype):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = torch.log_softmax(logits.to(dtype) / gen.temperature, -1)
        return lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)

    ref64 = full(copy.deepcopy(model).double(), torch.float64)
    plain = full(model, torch.float32).double()
    with torch.no_grad():
        fused = token_logps(model, batch, gen.temperature).double()
    err_fused = (fused - ref64)[mask].abs().max().item()
    err_plain = (plain - ref64)[mask].abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-6, (err_fused, err_plain)
    assert (fused[mask] <= 0).all()


def test_make_experience_scores_and_kl(lm):
    from fastalign.config import GenerationConfig, RewardConfig
    from fastalign.rollout.experience import make_experience, select, sequence_kl, token_logps
    from fastalign.rollout.rewards import RewardScorer
    from fastalign.rollout.verifiers import contains_word

    tok, model = lm
    rows = [
        {"index": i, "prompt_ids": tok(p).input_ids, "prompt_text": p, "columns": {}}
        for i, p in enumerate(PROMPTS)
    ]
    cfg = RewardConfig(function="fastalign.rollout.verifiers:contains_word", function_kwargs={"word": "a"})
    scorer = RewardScorer(cfg, device=torch.device("cpu"))
    gen = GenerationConfig(max_new_tokens=10, temperature=0.9, batch_size=8)
    exp = make_experience(model, tok, rows, gen, scorer, ref=model, seed=5)
    assert exp.scores.tolist() == contains_word(PROMPTS, exp.responses, word="a")
    assert exp.lengths.tolist() == [len(r) for r in exp.response_ids]
    assert exp.mask.sum(1).tolist() == exp.lengths.tolist()
    assert exp.metrics["kl"] == 0.0  # the reference is the policy itself
    assert exp.metrics["response/length"] == pytest.approx(exp.lengths.float().mean().item())
    with torch.no_grad():
        again = token_logps(model, exp.batch, 0.9)
    torch.testing.assert_close(exp.old_logps, again)
    shifted_ref = exp.old_logps - 0.5 * exp.mask
    assert sequence_kl(exp.old_logps, shifted_ref, exp.mask).tolist() == pytest.approx(
        (0.5 * exp.lengths.float()).tolist()
    )
    mb = select(exp, [2, 0])
    width = int(exp.batch["attention_mask"][[2, 0]].sum(1).max())
    assert mb["input_ids"].shape == (2, width) and mb["old_logps"].shape == (2, width - 1)
    assert torch.equal(mb["input_ids"], exp.batch["input_ids"][[2, 0], :width])


# ---------------------------------------------------------------------------------------------
# PPO advantage whitening over the global batch (2 gloo ranks)
# ---------------------------------------------------------------------------------------------
class _Rt:
    distributed = True


def _whiten_worker(rank: int, port: int, x: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from fastalign.trainers.ppo import whiten

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = x.shape[0] // 2
    sl = slice(rank * half, (rank + 1) * half)
    torch.save(whiten(x[sl], mask[sl], _Rt()), f"{out}.{rank}")
    dist.destroy_process_group()


def test_whitening_uses_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from fastalign.trainers.ppo import whiten

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    x[3:] += 4  # the two ranks' halves have different means: per-rank whitening would differ
    mask = torch.rand(6, 5, generator=g) > 0.3
    ref = x[mask].double()
    expect = torch.where(mask, (x.double() - ref.mean()) / (ref.std() + 1e-8), 0.0)
    torch.testing.assert_close(whiten(x.double(), mask), expect)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "w")
    mp.start_processes(_whiten_worker, args=(port, x, mask, out), nprocs=2, start_method="spawn")
    both = torch.cat([torch.load(f"{out}.0"), torch.load(f"{out}.1")])
    torch.testing.assert_close(both.double(), expect, atol=1e-5, rtol=1e-5)
