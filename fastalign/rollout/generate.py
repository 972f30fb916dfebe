"""Sampling responses from a policy for rollouts (PPO, GRPO, online DPO) and Constitutional AI.

`generate(model, tokenizer, prompts, gen)` takes token-id prompts (already chat-templated) and
returns the generated tokens only, cut at the first EOS (kept) or at the token that completes a
stop string (kept), plus the log-prob of every sampled token under the *sampling* distribution
`log_softmax(logits / temperature)` — without the top-k / top-p renormalisation, because that is
the quantity the PPO ratio recomputes at train time from a plain forward.

Why the post-processing instead of trusting HF's output: HF pads finished rows with the pad id,
which for many chat models (SmolLM2) *is* the EOS id, so a pad mask would cut or keep the wrong
tokens; and HF's `stop_strings` criterion only stops the batch early, it does not truncate.

Seeding: with `seed`, batch `i` of the call runs after `torch.manual_seed(seed + i)`, so a row's
sample depends on the seed, its batch index and its batch mates — not on how many random numbers
earlier batches (or earlier calls) consumed. The caller's RNG state is restored afterwards, so a
seeded rollout does not reset the stream that dropout and data shuffling draw from. The seed is
not offset by rank: ranks holding the same prompts draw the same samples unless the caller
passes e.g. `seed + rank * 1_000_003`. Without `seed`, sampling draws from the global RNG.

ZeRO-3 (`GenerationConfig.zero_mode`): "gather" all-gathers the full parameters once around all
batches of the call and generates on every rank independently (fast per token, needs the full
model in memory on each rank); "synced" keeps the parameters sharded and generates with
`synced_gpus=True`, so every rank keeps running (dummy) forwards — each gathering one layer at a
time — until all ranks are done; "auto" gathers when the full parameters take at most half of the
free device memory (CUDA) or available RAM (CPU). Ranks may hold different numbers of prompts:
"synced" agrees on the number of HF generate calls with an all-reduce (max) and ranks with fewer
batches run a dummy batch whose output is dropped, because each forward is a collective; with
"gather" the ZeRO-3 hooks are detached while generating, so ranks run independently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastalign.config import GenerationConfig
from fastalign.engine.dist import is_main_process
from fastalign.models import unwrap_model

AUTO_GATHER_FRACTION = 0.5  # "auto" gathers when full params <= this fraction of free memory


@dataclass
class Generations:
    """One entry per prompt, in input order."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated tokens only, cut after EOS / stop string (kept)
    finished: list[bool]  # True: ended by EOS or a stop string; False: hit max_new_tokens
    texts: list[str]  # decode(response_ids, skip_special_tokens=True)
    logprobs: list[list[float]] | None  # log_softmax(logits / T) of each sampled token, or None

    def __len__(self) -> int:
        return len(self.prompt_ids)


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    gen: GenerationConfig,
    *,
    seed: int | None = None,
    return_logprobs: bool = False,
    eos_token_ids: Sequence[int] | None = None,
    min_new_tokens: int = 0,
) -> Generations:
    """Sample one response per prompt (see the module docstring for cutting, seeding, ZeRO-3).

    `model`: HF causal LM, peft model or DeepSpeed engine; it runs in eval mode under no_grad and
    its previous train/eval modes are restored. `min_new_tokens` suppresses EOS before that many
    tokens (benchmarks use it for equal-length rows). Under ZeRO-3 this is collective: every rank
    must call it (with any number of prompts, zero included).
    """

    gen.validate()
    if not 0 <= min_new_tokens <= gen.max_new_tokens:
        raise ValueError(f"generate: min_new_tokens={min_new_tokens} must be in [0, max_new_tokens]")
    base = unwrap_model(model)
    rows = _check_prompts(prompts, base, gen.max_new_tokens)
    eos = _eos_ids(base, tokenizer, eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    batches = [rows[i : i + gen.batch_size] for i in range(0, len(rows), gen.batch_size)]
    zero3 = _is_zero3(base)
    mode = _choose_mode(base, gen.zero_mode) if zero3 else None
    # synced: every forward is a collective, so every rank makes the same number of generate
    # calls; gathered (hooks detached) or not ZeRO-3: ranks generate independently
    n_calls = _global_max(len(batches), base) if mode == "synced" else len(batches)
    out = Generations([], [], [], [], [] if return_logprobs else None)
    rng = _forked_rng(base) if seed is not None else nullcontext()
    with rng, _eval_mode(model), torch.no_grad(), _gathered_for_generation(model, base, mode == "gather"):
        for i in range(n_calls):
            real = i < len(batches)
            if seed is not None:
                torch.manual_seed(seed + i)
            batch = batches[i] if real else [[pad]]  # dummy batch: keeps this rank in the collectives
            new, logps = _generate_batch(
                base, tokenizer, batch, gen, pad, eos, min_new_tokens, return_logprobs, mode == "synced"
            )
            if real:
                _collect(out, tokenizer, batch, new, logps, eos, gen.stop)
    return out


def _forked_rng(base):
    """The global RNG state (CPU, and the model's CUDA device) saved here and restored on exit."""
    device = next(base.parameters()).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _check_prompts(prompts: Sequence[Sequence[int]], base, max_new_tokens: int) -> list[list[int]]:
    max_pos = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    rows = []
    for i, p in enumerate(prompts):
        row = [int(t) for t in p]
        if not row:
            raise ValueError(f"generate: prompt {i} is empty; expected at least one token id")
        if max_pos is not None and len(row) > max_pos - max_new_tokens:
            raise ValueError(
                f"generate: prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} "
                f"the model's max_position_embeddings={max_pos} allows at most {max_pos - max_new_tokens}"
            )
        rows.append(row)
    return rows


def _eos_ids(base, tokenizer, eos_token_ids: Sequence[int] | None) -> list[int]:
    """The explicit ids, else generation_config.eos_token_id (int or list) + tokenizer.eos_token_id."""
    if eos_token_ids is not None:
        ids = [int(t) for t in eos_token_ids]
        if not ids:
            raise ValueError("generate: eos_token_ids is empty; expected at least one token id (or None)")
        return ids
    ids: list[int] = []
    cfg_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    for t in [*(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]), tokenizer.eos_token_id]:
        if t is not None and int(t) not in ids:
            ids.append(int(t))
    if not ids:
        raise ValueError(
            "generate: no EOS id (model generation_config and tokenizer have none); pass eos_token_ids"
        )
    return ids


def _is_zero3(base) -> bool:
    return any(hasattr(p, "ds_id") for p in base.parameters())


def _global_max(n: int, base) -> int:
    """Max of `n` over ranks (collective). gloo reduces CPU tensors, nccl CUDA ones."""

    if not (dist.is_available() and dist.is_initialized()):
        return n
    device = next(base.parameters()).device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _full_param_bytes(base) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in base.parameters())


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


_LOGGED: list[str] = []  # the last "auto" choice logged by this process


def _choose_mode(base, zero_mode: str) -> str:
    """ "gather" | "synced"; "auto" decides on this rank's free memory, agreed across ranks (all
    ranks must take the same path: gather is a collective, synced_gpus too)."""
    if zero_mode != "auto":
        return zero_mode
    need = _full_param_bytes(base)
    free = _free_bytes(next(base.parameters()).device)
    fits = int(need <= AUTO_GATHER_FRACTION * free)
    all_fit = -_global_max(-fits, base)  # min over ranks
    mode = "gather" if all_fit else "synced"
    if mode not in _LOGGED[-1:]:
        _LOGGED[:] = [mode]

        if is_main_process():
            print(
                f"fastalign.generate: zero_mode auto -> {mode} (full params {need / 2**20:.1f} MiB, "
                f"free {free / 2**20:.0f} MiB on rank 0)",
                file=sys.stderr,
            )
    return mode


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """eval() for the call; every submodule's own previous mode restored afterwards."""
    before = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in before:
            m.training = training


def _gathered_for_generation(model, base, enabled: bool):
    return _gathered_unhooked(model, base) if enabled else nullcontext()


def _zero3_offload(model):
    """The engine's DeepSpeedZeRoOffload (owner of the per-module ZeRO-3 hooks) or None."""
    m = model
    for _ in range(8):  # engine -> peft -> HF model; a short wrapper chain
        opt = getattr(m, "optimizer", None)
        offload = getattr(opt, "parameter_offload", opt)  # trainable: stage-3 optimizer; frozen: the offload
        if offload is not None and hasattr(offload, "forward_hooks"):
            return offload
        m = m.get_base_model() if hasattr(m, "get_base_model") else getattr(m, "module", None)
        if m is None:
            return None
    return None


@contextmanager
def _gathered_unhooked(model, base) -> Iterator[None]:
    """Full parameters on every rank for the whole block, ZeRO-3 module hooks detached.

    Without detaching, each submodule's post-forward hook would re-partition the parameters it just
    used, and the next forward would all-gather them again — one collective per module per token,
    which hangs when ranks generate different numbers of tokens. The root's start-of-forward hook
    goes too: its `reset_step` broadcasts (trace checks) until a trace is complete, and
    re-registering the hooks invalidates the trace, so the first forwards after every gather would
    be collectives. DeepSpeed's own `unwrap_model_for_generation` keeps that hook (it hangs when
    ranks make different numbers of forwards); here the hooks also come back when generation raises.
    Pass the engine (not `engine.module`): the hooks are found through it.
    """
    import deepspeed

    offload = _zero3_offload(model)
    if offload is None and hasattr(base, "ds_id"):  # hooked by an engine we cannot reach
        raise ValueError(
            "generate: zero_mode 'gather' needs the DeepSpeed engine itself (its ZeRO-3 hooks are detached "
            "while generating), got a module inside one; pass the engine, or use zero_mode 'synced'"
        )
    with deepspeed.zero.GatheredParameters(list(base.parameters()), modifier_rank=None):
        if offload is None:  # a sharded module without an engine has no hooks to detach
            yield
            return
        root = offload.module
        for p in root.parameters():
            p.ds_active_sub_modules.clear()
        start_hook = root._forward_pre_hooks.get(offload.fwd_pre_hook.id)  # coordinator.reset_step
        for hook in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:  # the original order: the start-of-forward hook first, then the per-module hooks
            if start_hook is not None:
                offload.fwd_pre_hook = root.register_forward_pre_hook(start_hook)
            offload._register_deepspeed_module(root)


def _left_pad(batch: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, L)
    for i, r in enumerate(batch):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _generate_batch(
    base, tokenizer, batch, gen: GenerationConfig, pad, eos, min_new_tokens, return_logprobs, synced
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N) generated ids and (B, N) sampling log-probs (or None) for one HF generate call."""
    ids, mask = _left_pad(batch, pad, next(base.parameters()).device)
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        do_sample=gen.do_sample,
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        eos_token_id=eos,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=return_logprobs,
        synced_gpus=synced,
    )
    if gen.do_sample:  # top_k 0 passed as 0 (None would fall back to HF's default of 50)
        kw.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    if gen.stop:  # stops the batch early; the truncation in `_cut` is what guarantees the cut
        kw.update(stop_strings=list(gen.stop), tokenizer=tokenizer)
    res = base.generate(**kw)
    new = res.sequences[:, ids.shape[1] :]  # (B, N)
    if not return_logprobs:
        return new, None
    steps = []
    for t, logits in enumerate(res.logits):  # per step (B, V): no (B, N, V) tensor at once
        lp = torch.log_softmax(logits.float() / gen.temperature, dim=-1)
        steps.append(lp.gather(-1, new[:, t : t + 1]).squeeze(-1))  # (B,)
    return new, torch.stack(steps, dim=1)  # (B, N)


def _stop_len(tokenizer, toks: list[int], stop: Sequence[str]) -> int | None:
    """Length of the shortest prefix whose decoded text contains a stop string, or None."""
    if not stop or not any(s in tokenizer.decode(toks, skip_special_tokens=True) for s in stop):
        return None
    for k in range(1, len(toks) + 1):
        if any(s in tokenizer.decode(toks[:k], skip_special_tokens=True) for s in stop):
            return k
    return None


def _cut(tokenizer, toks: list[int], eos: Sequence[int], stop: Sequence[str]) -> tuple[int, bool]:
    """(kept length, finished): through the first EOS, or the token completing a stop string."""
    eos_set = set(eos)
    n = next((i + 1 for i, t in enumerate(toks) if t in eos_set), None)
    finished = n is not None
    n = len(toks) if n is None else n
    k = _stop_len(tokenizer, toks[:n], stop)
    if k is not None:
        return k, True
    return n, finished


def _collect(out: Generations, tokenizer, batch, new: torch.Tensor, logps, eos, stop) -> None:
    new_rows = new.tolist()
    lp_rows = logps.tolist() if logps is not None else None
    for r, prompt in enumerate(batch):
        n, finished = _cut(tokenizer, new_rows[r], eos, stop)
        resp = new_rows[r][:n]
        out.prompt_ids.append(prompt)
        out.response_ids.append(resp)
        out.finished.append(finished)
        out.texts.append(tokenizer.decode(resp, skip_special_tokens=True))
        if out.logprobs is not None and lp_rows is not None:
            out.logprobs.append(lp_rows[r][:n])
