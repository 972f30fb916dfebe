"""`fastalign cai label`: AI preference labels (RLAIF) from a feedback model's multiple choice.

Per prompt: two or more responses (sampled from the policy `model`, `num_responses` per prompt,
or given in `responses`), and for every pair (x, y) a principle drawn with the prompt's own RNG.
The feedback model reads

    Consider the following conversation between a human and an assistant:
    Human: <prompt>
    <principle's feedback question>
    Options:
    (A) <x>
    (B) <y>
    [assistant turn] The answer is: (

and the next-token logits of "A" and "B" give p_A = P(A) / (P(A) + P(B)) = sigmoid(l_A - l_B).
Models prefer one position regardless of content, so the pair is asked in both orders and
P(x better) = (p_A(x, y) + 1 - p_A(y, x)) / 2: swapping x and y gives exactly 1 - that.

Rows (`pairs.jsonl`): {"prompt", "chosen", "rejected", "p_chosen", "principle", "p_order1",
"p_order2"} with chosen the preferred response (p_chosen >= 0.5), p_order1 / p_order2 the
probability of chosen when it was shown as (A) / as (B) (their difference is the position bias;
p_chosen is their mean). Identical responses are not labelled (the trainers would drop the pair);
the trace says so. The trace (`trace.jsonl`) keeps every response and comparison.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

import torch

from fastalign.cai.config import LabelConfig
from fastalign.cai.constitution import Principle, load_constitution, pick
from fastalign.cai.prompts import (
    ANSWER_PREFIX,
    encode,
    feedback_messages,
    fit_context,
    has_chat_template,
    initial_messages,
    load_lm,
    load_prompts,
    mix_seed,
    prompt_key,
    raw_prompt,
    render,
    sample_replies,
    transcript,
)
from fastalign.data.sources import iter_rows
from fastalign.models import load_tokenizer

OUTPUT = "pairs.jsonl"


@dataclass(frozen=True)
class Item:
    index: int
    key: str
    prompt: str
    responses: tuple[str, ...] | None  # None: sample them from the policy


def input_files(cfg: LabelConfig) -> list[str]:
    return [
        f
        for f in (cfg.prompts if cfg.responses is None else None, cfg.responses, cfg.constitution)
        if f and f != "default"
    ]


def _text(value, where: str, name: str) -> str:
    """A response given as a string or as a one-message assistant list (chat rows)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name!r} must be a string (or one assistant message), got {value!r:.60}")
    return value.strip()


def _given(where: str, row: dict) -> tuple[str, tuple[str, ...]]:
    prompt = _text(row.get("prompt"), where, "prompt")
    if not prompt:
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if "responses" in row:
        values = row["responses"]
        if not isinstance(values, list) or len(values) < 2:
            raise ValueError(
                f"{where}: 'responses' must be a list of at least 2 responses, got {values!r:.60}"
            )
        return raw_prompt(prompt), tuple(_text(v, where, f"responses[{i}]") for i, v in enumerate(values))
    if "chosen" in row and "rejected" in row:
        return raw_prompt(prompt), (
            _text(row["chosen"], where, "chosen"),
            _text(row["rejected"], where, "rejected"),
        )
    raise ValueError(f"{where}: expected 'responses' (a list) or 'chosen' and 'rejected' next to 'prompt'")


def load_items(cfg: LabelConfig) -> list[Item]:
    if cfg.responses is None:
        return [
            Item(i, prompt_key(i, p), p, None)
            for i, p in enumerate(load_prompts(cfg.prompts, cfg.max_prompts))
        ]

    items = []
    for i, (where, row, error) in enumerate(iter_rows(cfg.responses, max_rows=cfg.max_prompts)):
        if error is not None:
            raise ValueError(f"{where}: {error}")
        prompt, responses = _given(where, row)
        items.append(Item(i, prompt_key(i, json.dumps([prompt, responses])), prompt, responses))
    if not items:
        raise ValueError(f"{cfg.responses}: no rows")
    return items


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of the tokens "A" and "B" as they follow "(" in the rendered question: the token the
    tokenizer appends to the prefix for the letter, else the vocabulary's plain "A" / "B"."""
    probe = render(tokenizer, feedback_messages("Hi", "x", "y", "Which?"), ANSWER_PREFIX)
    base = encode(tokenizer, probe)
    ids = []
    for letter in "AB":
        full = encode(tokenizer, probe + letter)
        if len(full) == len(base) + 1 and full[: len(base)] == base:
            ids.append(full[-1])
            continue
        tid = tokenizer.convert_tokens_to_ids(letter)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"feedback tokenizer: no single token for the answer letter {letter!r}")
        ids.append(int(tid))
    if ids[0] == ids[1]:
        raise ValueError(f"feedback tokenizer: 'A' and 'B' map to the same token id {ids[0]}")
    return ids[0], ids[1]


def score_a(
    model, tokenizer, texts: list[str], batch_size: int, ab: tuple[int, int]
) -> list[tuple[float, float]]:
    """Per rendered question: (p_A normalised over {A, B}, P(A) + P(B) under the full softmax)."""

    out: list[tuple[float, float]] = []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(texts), batch_size):
        rows = [fit_context(encode(tokenizer, t), model, 1)[0] for t in texts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions count real tokens only
        with torch.no_grad():
            logits = (
                model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=pos.to(device),
                    logits_to_keep=1,
                    use_cache=False,
                )
                .logits[:, -1, :]
                .float()
            )  # (B, V): the next token after "("
        logp = torch.log_softmax(logits, dim=-1)
        la, lb = logp[:, ab[0]], logp[:, ab[1]]  # (B,)
        p_a = torch.sigmoid(la - lb)  # = P(A) / (P(A) + P(B))
        mass = la.exp() + lb.exp()
        out += list(zip(p_a.tolist(), mass.tolist(), strict=True))
    return out


def _comparisons(
    item: Item, responses: tuple[str, ...], principles: list[Principle], seed: int
) -> list[dict]:
    rng = random.Random(mix_seed(seed, item.index))
    out = []
    for i, j in combinations(range(len(responses)), 2):
        p = pick(principles, rng)  # drawn for every pair, so a skipped pair does not shift the rest
        c = {"i": i, "j": j, "principle": p.id, "question": p.feedback}
        if responses[i].strip() == responses[j].strip():
            c["skipped"] = "identical responses"
        out.append(c)
    return out


def label_batch(feedback, items: list[Item], responses: list[tuple[str, ...]], principles, cfg) -> list[dict]:
    """Traces of one batch: every comparison asked in both orders, scored in feedback batches."""
    model, tok, ab = feedback
    traces, questions = [], []
    for it, resp in zip(items, responses, strict=True):
        comps = _comparisons(it, resp, principles, cfg.seed)
        for c in comps:
            if "skipped" not in c:
                x, y = resp[c["i"]], resp[c["j"]]
                for first, second in ((x, y), (y, x)):
                    questions.append(
                        render(tok, feedback_messages(it.prompt, first, second, c["question"]), ANSWER_PREFIX)
                    )
        traces.append(
            {
                "index": it.index,
                "key": it.key,
                "prompt": it.prompt,
                "responses": list(resp),
                "comparisons": comps,
                "seed": mix_seed(cfg.seed, it.index),
            }
        )
    scores = iter(score_a(model, tok, questions, cfg.feedback_batch_size, ab))
    for t in traces:
        for c in t["comparisons"]:
            if "skipped" in c:
                continue
            (p1, m1), (p2, m2) = next(scores), next(scores)
            c["p_a"] = [p1, p2]  # p_A with (A, B) = (x, y), then (y, x)
            c["ab_mass"] = [m1, m2]  # how much probability went to "A" or "B" at all
            c["p_first"] = (p1 + 1.0 - p2) / 2.0  # P(responses[i] better), position bias averaged out
    return traces


def make_runner(cfg: LabelConfig) -> Callable[[int, list[Item]], list[dict]]:
    """run_batch(batch_no, items) -> traces; loads the feedback model, the policy, the inputs."""

    principles = load_constitution(cfg.constitution)
    fb_model, fb_tok = load_lm(cfg.feedback(), cfg.device)
    feedback = (fb_model, fb_tok, answer_token_ids(fb_tok))
    policy = None
    if cfg.responses is None:
        same = cfg.feedback() is cfg.model
        policy = (fb_model, fb_tok) if same else load_lm(cfg.model, cfg.device)
    row_tok = policy[1] if policy else (load_lm_tokenizer(cfg.model) if cfg.model.path else fb_tok)
    chat = cfg.row_format == "chat" or (cfg.row_format == "auto" and has_chat_template(row_tok))

    def run_batch(batch_no: int, items: list[Item]) -> list[dict]:
        if policy is None:
            responses = [it.responses for it in items]
        else:
            n = cfg.num_responses
            convs = [initial_messages(it.prompt) for it in items for _ in range(n)]
            texts, _ = sample_replies(*policy, convs, cfg.generation, mix_seed(cfg.seed, batch_no, 0))
            responses = [tuple(texts[k * n : (k + 1) * n]) for k in range(len(items))]
        traces = label_batch(feedback, items, responses, principles, cfg)
        for t in traces:
            t["format"] = "chat" if chat else "text"  # of the rows: rebuilt from traces on resume
        return traces

    return run_batch


def load_lm_tokenizer(model_cfg):

    tok_path = model_cfg.tokenizer or model_cfg.path
    return load_tokenizer(
        tok_path,
        gguf_file=None if model_cfg.tokenizer else model_cfg.gguf_file,
        chat_template=getattr(model_cfg, "chat_template", None),
    )


def rows(trace: dict) -> list[dict]:
    """The preference rows of a trace (see the module docstring for the fields)."""
    out, chat = [], trace["format"] == "chat"
    prompt = trace["prompt"] if chat else transcript([{"role": "user", "content": trace["prompt"]}])
    for c in trace["comparisons"]:
        if "skipped" in c:
            continue
        x, y = trace["responses"][c["i"]], trace["responses"][c["j"]]
        (p1, p2), p = c["p_a"], c["p_first"]
        if p >= 0.5:
            chosen, rejected, o1, o2 = x, y, p1, 1.0 - p2
        else:
            chosen, rejected, o1, o2, p = y, x, p2, 1.0 - p1, 1.0 - p
        if chat:
            chosen, rejected = ([{"role": "assistant", "content": r}] for r in (chosen, rejected))
        else:
            chosen, rejected = " " + chosen, " " + rejected
        out.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "p_chosen": p,
                "principle": c["principle"],
                "p_order1": o1,
                "p_order2": o2,
            }
        )
    return out
