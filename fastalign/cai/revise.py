"""`fastalign cai revise`: initial response, then K critique -> revision rounds per prompt.

For a batch of prompts (all advance round by round together, one generate() call per stage):

1. initial response to the prompt (few-shot examples in front, if any);
2. for each round k: pick a principle with the prompt's own RNG, ask for a critique of the current
   response under that principle, then for a revision given the critique;
3. a revision that is empty, has no words, or just repeats the revision request is *degenerate*:
   the previous response is kept and the round records why (`kept_previous`).

A trace per prompt {"index", "key", "prompt", "initial", "rounds": [{"principle", "critique",
"revision"[, "kept_previous"]}], "final", "seed"[, "truncated", "skipped"]} goes to `trace.jsonl`; the
SFT row {"prompt", "completion": final} derived from it goes to `sft.jsonl` (skipped, with the
reason in the trace, when even the initial response is empty). The driver (fastalign.cai.cli)
handles batching by index, resuming and writing.

Seeds: the prompt's principle RNG is seeded with mix(seed, index) (the trace's "seed"); stage s of
batch b samples under mix(seed, b, s), so the same batch always draws the same tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fastalign.cai import prompts as cai_prompts
from fastalign.cai.config import ReviseConfig
from fastalign.cai.constitution import Principle, load_constitution, pick
from fastalign.cai.prompts import (
    critique_messages,
    has_chat_template,
    initial_messages,
    load_few_shot,
    load_lm,
    load_prompts,
    mix_seed,
    prompt_key,
    revision_messages,
    transcript,
)

OUTPUT = "sft.jsonl"


@dataclass(frozen=True)
class Item:
    index: int
    key: str
    prompt: str


def input_files(cfg: ReviseConfig) -> list[str]:
    """Files whose content defines the run (their hashes are checked on resume)."""
    return [f for f in (cfg.prompts, cfg.few_shot, cfg.constitution) if f and f != "default"]


def load_items(cfg: ReviseConfig) -> list[Item]:
    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    load_few_shot(cfg.few_shot)  # checked before any model is loaded
    return [Item(i, prompt_key(i, p), p) for i, p in enumerate(prompts)]


def degenerate(revision: str, request: str) -> str | None:
    """Why a revision cannot replace the response, or None when it can."""
    if not revision:
        return "empty revision"
    if not any(ch.isalnum() for ch in revision):
        return "revision has no words"
    if revision.strip().lower() == request.strip().lower():
        return "revision repeats the revision request"
    return None


def make_runner(cfg: ReviseConfig) -> Callable[[int, list[Item]], list[dict]]:
    """run_batch(batch_no, items) -> traces; loads the model and the inputs."""

    principles = load_constitution(cfg.constitution)
    few_shot = load_few_shot(cfg.few_shot)
    model, tok = load_lm(cfg.model, cfg.device)
    chat = cfg.row_format == "chat" or (cfg.row_format == "auto" and has_chat_template(tok))

    def run_batch(batch_no: int, items: list[Item]) -> list[dict]:
        traces = revise_batch(model, tok, items, principles, few_shot, cfg, batch_no)
        for t in traces:
            t["format"] = "chat" if chat else "text"  # of the rows: rebuilt from traces on resume
        return traces

    return run_batch


def revise_batch(
    model, tokenizer, items: list[Item], principles: list[Principle], few_shot, cfg, batch_no: int
):
    """Traces of one batch of prompts (see the module docstring)."""

    truncated = [0] * len(items)  # contexts of each prompt cut to fit the model's positions

    def sample(conversations: list[list[dict]], stage: int) -> list[str]:
        seed = mix_seed(cfg.seed, batch_no, stage)
        # through the module: tests (and users) may replace the sampler
        texts, cut = cai_prompts.sample_replies(model, tokenizer, conversations, cfg.generation, seed)
        for j, c in enumerate(cut):
            truncated[j] += c
        return texts

    seeds = [mix_seed(cfg.seed, it.index) for it in items]
    rngs = [random.Random(s) for s in seeds]
    current = sample([initial_messages(it.prompt, few_shot) for it in items], 0)
    traces = [
        {"index": it.index, "key": it.key, "prompt": it.prompt, "initial": c, "rounds": [], "seed": s}
        for it, c, s in zip(items, current, seeds, strict=True)
    ]
    for k in range(cfg.rounds):
        chosen = [pick(principles, rng) for rng in rngs]
        critiques = sample(
            [
                critique_messages(it.prompt, cur, p, few_shot)
                for it, cur, p in zip(items, current, chosen, strict=True)
            ],
            1 + 2 * k,
        )
        revisions = sample(
            [
                revision_messages(it.prompt, cur, crit, p, few_shot)
                for it, cur, crit, p in zip(items, current, critiques, chosen, strict=True)
            ],
            2 + 2 * k,
        )
        for j, (p, crit, rev) in enumerate(zip(chosen, critiques, revisions, strict=True)):
            step = {"principle": p.id, "critique": crit, "revision": rev}
            why = degenerate(rev, p.revision)
            if why:
                step["kept_previous"] = why
            else:
                current[j] = rev
            traces[j]["rounds"].append(step)
    for t, final, cut in zip(traces, current, truncated, strict=True):
        t["final"] = final
        if not final:
            t["skipped"] = "final response is empty (no SFT row)"
        if cut:
            t["truncated"] = cut
    return traces


def rows(trace: dict) -> list[dict]:
    """The SFT row of a trace: chat rows (message lists, templated by the trainer) or plain
    transcript rows that match how a template-less model was prompted here."""
    if trace.get("skipped"):
        return []
    if trace["format"] == "chat":
        return [{"prompt": trace["prompt"], "completion": [{"role": "assistant", "content": trace["final"]}]}]
    prompt = transcript([{"role": "user", "content": trace["prompt"]}])
    return [{"prompt": prompt, "completion": " " + trace["final"]}]
