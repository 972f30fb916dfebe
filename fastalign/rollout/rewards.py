"""Sequence rewards for rollouts: reward models (an ensemble, each with its own tokenizer), a Python
reward function named in the config, or both; then penalties, running normalisation and clipping.

Why decode → re-encode: a reward model may use another tokenizer than the policy (a MiniLM / BERT
RM for a Llama policy), so it sees the text of the prompt and response, encoded the way fastalign's
RM recipe encodes a (prompt, response) pair (`fastalign.data.tokenize.Encoder`): prompt with the
tokenizer's special tokens, response without, EOS appended; or the tokenizer's chat template
(`template`). A tokenizer without EOS (BERT) encodes the pair natively: [CLS] prompt [SEP] response
[SEP] with its token types. Too-long inputs lose the start of the prompt first, never its leading
special tokens, and the response only when it alone does not fit (its end, keeping the final EOS).

Reward functions are imported, never evaluated from text: "package.module:function" with importlib,
"path/to/file.py:function" with `spec_from_file_location`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fastalign.constants import IGNORE_INDEX
from fastalign.data.tokenize import Encoder
from fastalign.models import load_reward_model, load_tokenizer
from fastalign.rollout.reward_functions import check_scores, load_reward_function

if TYPE_CHECKING:
    from fastalign.config import RewardConfig


# ---------------------------------------------------------------------------------------------
# encoding a (prompt, response) pair for one reward model
# ---------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One reward-model input; `kinds` marks each token: "s" special (kept), "p" prompt, "r" response."""

    ids: list[int]
    kinds: list[str]
    types: list[int] | None = None  # token_type_ids of pair-encoding tokenizers (BERT)


def encode_pair(tok, prompt: str, response: str, *, chat: bool) -> Encoded:
    """The untruncated RM input for (prompt, response): see the module docstring."""
    if getattr(tok, "eos_token_id", None) is None:
        return _encode_native_pair(tok, prompt, response)

    if chat:
        messages = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}]
        rec = {"chat": True, "prompt": messages[0], "completion": messages[1]}
    else:
        rec = {"chat": False, "prompt": prompt, "completion": response}
    ex, _ = Encoder("sft", tok, max_length=1 << 30, max_prompt_length=None)(rec)
    ids, n_prompt = ex["input_ids"], sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
    special = set(tok.all_special_ids)
    lead = next((i for i, t in enumerate(ids[:n_prompt]) if t not in special), n_prompt)
    kinds = ["s"] * lead + ["p"] * (n_prompt - lead) + ["r"] * (len(ids) - n_prompt)
    kinds[-1] = "s"  # the EOS the encoder appended
    return Encoded(ids, kinds)


def _encode_native_pair(tok, prompt: str, response: str) -> Encoded:
    enc = tok(prompt, response)
    try:
        seq = enc.sequence_ids()
    except (ValueError, AttributeError, TypeError):
        raise ValueError(
            f"reward model tokenizer {type(tok).__name__}: no EOS token and no fast pair encoding; "
            "set tokenizer.eos_token"
        ) from None
    kinds = ["s" if s is None else "p" if s == 0 else "r" for s in seq]
    types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
    return Encoded(list(enc["input_ids"]), kinds, types)


def truncate(e: Encoded, max_length: int) -> tuple[Encoded, bool]:
    """Drop the earliest prompt tokens, then (only if needed) the last response tokens, to fit
    `max_length`; special tokens stay. Returns (encoded, response was cut)."""
    excess = len(e.ids) - max_length
    if excess <= 0:
        return e, False
    drop: set[int] = set()
    order = [i for i, k in enumerate(e.kinds) if k == "p"] + [
        i for i in reversed(range(len(e.kinds))) if e.kinds[i] == "r"
    ]
    for i in order[:excess]:
        drop.add(i)
    if len(drop) < excess:
        raise ValueError(
            f"reward.max_length={max_length} is shorter than the reward model's special tokens alone "
            f"({len(e.ids) - len(order)})"
        )
    keep = [i for i in range(len(e.ids)) if i not in drop]
    cut_response = any(e.kinds[i] == "r" for i in drop)
    types = [e.types[i] for i in keep] if e.types is not None else None
    return Encoded([e.ids[i] for i in keep], [e.kinds[i] for i in keep], types), cut_response


def collate(rows: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (and token_type_ids when the rows have them)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    types = torch.zeros((len(rows), width), dtype=torch.long) if rows[0].types is not None else None
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
        if types is not None:
            types[i, : len(r.ids)] = torch.tensor(r.types)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if types is not None:
        batch["token_type_ids"] = types.to(device)
    return batch


# ---------------------------------------------------------------------------------------------
# running statistics
# ---------------------------------------------------------------------------------------------
class RunningMoments:
    """Mean / population std of every value seen (Chan et al.'s parallel Welford update, float64);
    under a distributed runtime each batch's moments are combined over ranks first, so every rank
    normalises with the same statistics."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def update(self, x: torch.Tensor, runtime=None) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        parts = [(n, x.mean().item() if n else 0.0, ((x - x.mean()) ** 2).sum().item() if n else 0.0)]
        if getattr(runtime, "distributed", False):
            parts = _gather_moments(parts[0], x.device if x.device.type != "cpu" else _dist_device())
        for part in parts:
            self._merge(*part)

    def _merge(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.m2 = int(d["count"]), float(d["mean"]), float(d["m2"])


def _dist_device() -> torch.device:

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_moments(part: tuple[int, float, float], device) -> list[tuple[int, float, float]]:

    mine = torch.tensor(part, dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [(int(t[0].item()), t[1].item(), t[2].item()) for t in every]


def _max_over_ranks(n: int, runtime) -> int:
    """ZeRO-3 frozen models gather their shards in every forward: all ranks must run as many."""
    if not getattr(runtime, "distributed", False) or getattr(runtime, "stage", 0) != 3:
        return n

    t = torch.tensor([n], dtype=torch.long, device=_dist_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ---------------------------------------------------------------------------------------------
# the scorer
# ---------------------------------------------------------------------------------------------
@dataclass
class RewardModel:
    """A frozen reward model, the module to call (a ZeRO-3 engine or the model) and its tokenizer."""

    name: str
    model: torch.nn.Module
    forward: Any
    tokenizer: Any
    chat: bool


def _use_chat(tok, template: str, name: str) -> bool:
    has = bool(getattr(tok, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError(
            f"reward.template=chat but the tokenizer of reward model {name!r} has no chat template"
        )
    return has if template == "auto" else template == "chat"


def load_reward_models(
    cfg: RewardConfig, *, device, runtime=None, dtype=None, seed: int = 0
) -> list[RewardModel]:
    """Each of `cfg.models`, frozen, with its tokenizer. A fresh score head (an RM built on a plain
    backbone) is initialised from `seed + i` without touching the global RNG streams."""

    out = []
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    for i, path in enumerate(cfg.models):
        tok = load_tokenizer(path)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed + i)
            with runtime.init_models() if runtime is not None else nullcontext():
                model = load_reward_model(
                    path, dtype=dtype or "auto", device=str(device), pad_token_id=tok.pad_token_id
                )
        model.eval().requires_grad_(False)
        forward = runtime.frozen(model) if runtime is not None else model
        out.append(RewardModel(path, model, forward, tok, _use_chat(tok, cfg.template, path)))
    return out


class RewardScorer:
    """Final rewards (N,) for decoded (prompt, response) pairs; see the module docstring.

    scorer = RewardScorer(cfg.reward, device=device, runtime=rt)
    rewards, metrics = scorer(prompts, responses, finished=done, response_lengths=lens)
    """

    def __init__(self, cfg: RewardConfig, *, device, runtime=None, dtype=None, seed: int = 0) -> None:
        if not cfg.models and cfg.function is None:
            raise ValueError(
                "reward: no reward source; give reward.models (reward model folders) and/or reward.function"
            )
        self.cfg, self.device, self.runtime = cfg, torch.device(device), runtime
        self.function = load_reward_function(cfg.function) if cfg.function is not None else None
        self.models = load_reward_models(cfg, device=self.device, runtime=runtime, dtype=dtype, seed=seed)
        self.moments = RunningMoments()
        self._warned_cut = False

    @torch.no_grad()
    def describe(self) -> str:
        """The active reward sources and shaping, for the run log (what the policy is trained on)."""
        c = self.cfg
        parts = []
        if c.models:
            how = f", {c.ensemble} of {len(c.models)}" if len(c.models) > 1 else ""
            parts.append(f"reward model(s) {', '.join(c.models)} (weight {c.model_weight:g}{how})")
        if c.function:
            kw = f", kwargs {dict(c.function_kwargs)}" if c.function_kwargs else ""
            parts.append(f"function {c.function} (weight {c.function_weight:g}{kw})")
        if c.length_penalty:
            parts.append(f"length penalty {c.length_penalty:g}/token")
        if c.missing_eos_penalty is not None:
            parts.append(f"missing-EOS penalty {c.missing_eos_penalty:g}")
        if c.normalize:
            parts.append("running normalisation")
        if c.clip is not None:
            parts.append(f"clipped to +-{c.clip:g}")
        return "; ".join(parts)

    def score_models(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(M, N) float32 raw scores on `device`, one row per reward model."""
        _check_len("responses", responses, len(prompts))
        return torch.stack([self._score(rm, prompts, responses) for rm in self.models]).to(self.device)

    def _score(self, rm: RewardModel, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        rows, cut = [], 0
        for p, r in zip(prompts, responses, strict=True):
            enc, was_cut = truncate(encode_pair(rm.tokenizer, p, r, chat=rm.chat), self.cfg.max_length)
            rows.append(enc)
            cut += was_cut
        if cut and not self._warned_cut:
            self._warned_cut = True
            print(
                f"[reward] {cut}/{len(rows)} responses longer than reward.max_length={self.cfg.max_length} "
                f"tokens of {rm.name!r} were cut at the end (raise reward.max_length)",
                file=sys.stderr,
            )
        bs = self.cfg.batch_size
        n_batches = -(-len(rows) // bs)
        scores = []
        for b in range(_max_over_ranks(n_batches, self.runtime)):
            chunk = (
                rows[b * bs : (b + 1) * bs] if b < n_batches else rows[:1] or [Encoded([0, 0], ["s", "s"])]
            )
            batch = collate(chunk, rm.tokenizer.pad_token_id, self.device)
            logits = rm.forward(**batch).logits  # (B, 1)
            if b < n_batches:
                scores.append(logits[:, 0].float())
        return torch.cat(scores) if scores else torch.zeros(0, device=self.device)

    def _call_function(self, prompts, responses, columns: dict[str, list] | None) -> torch.Tensor:
        kwargs = dict(self.cfg.function_kwargs)
        for key, col in (columns or {}).items():
            if key in kwargs:
                raise ValueError(f"reward: column {key!r} clashes with reward.function_kwargs.{key}")
            _check_len(f"column {key!r}", col, len(responses))
            kwargs[key] = list(col)
        values = self.function(list(prompts), list(responses), **kwargs)
        return torch.tensor(check_scores(values, self.cfg.function, len(responses)), dtype=torch.float64)

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        finished: list[bool],
        response_lengths: list[int],
        columns: dict[str, list] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(N,) float32 rewards on `device` and the reward metrics (see the API notes in the README)."""
        n, cfg = len(responses), self.cfg
        for name, seq in (
            ("prompts", prompts),
            ("finished", finished),
            ("response_lengths", response_lengths),
        ):
            _check_len(name, seq, n)
        raw = torch.zeros(n, dtype=torch.float64)  # (N,)
        metrics: dict[str, float] = {}
        if self.models:
            scores = self.score_models(prompts, responses).double().cpu()  # (M, N)
            agg = scores.min(dim=0).values if cfg.ensemble == "min" else scores.mean(dim=0)
            raw += cfg.model_weight * agg
            metrics["reward/model_mean"] = agg.mean().item()
            if len(self.models) > 1:
                metrics["reward/ensemble_spread"] = (scores.amax(dim=0) - scores.amin(dim=0)).mean().item()
        if self.function is not None:
            fvals = self._call_function(prompts, responses, columns)
            raw += cfg.function_weight * fvals
            metrics["reward/function_mean"] = fvals.mean().item()
        if cfg.length_penalty:
            raw -= cfg.length_penalty * torch.tensor(response_lengths, dtype=torch.float64)
        if cfg.missing_eos_penalty is not None:
            raw -= cfg.missing_eos_penalty * (~torch.tensor(finished, dtype=torch.bool)).double()
        metrics["reward/raw_mean"] = raw.mean().item()
        metrics["reward/raw_std"] = raw.std(correction=0).item() if n else 0.0
        out = raw
        if cfg.normalize:
            self.moments.update(raw, self.runtime)
            out = (raw - self.moments.mean) / max(self.moments.std, 1e-8)
        if cfg.clip is not None:
            metrics["reward/clipped_frac"] = (out.abs() > cfg.clip).double().mean().item()
            out = out.clamp(-cfg.clip, cfg.clip)
        return out.float().to(self.device), metrics

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.moments.load_state_dict(d["moments"])


def _check_len(name: str, seq: Sequence, n: int) -> None:
    if len(seq) != n:
        raise ValueError(f"reward: {name} has {len(seq)} entries, expected {n} (one per response)")
